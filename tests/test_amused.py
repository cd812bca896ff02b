"""aMUSEd (issue #11): LoRAs made with peft on diffusers' ``UVit2DModel`` and transformers'
``CLIPTextModelWithProjection``, saved by diffusers' own ``AmusedLoraLoaderMixin.save_lora_weights``, are detected,
validated, converted to PEFT and back, loaded back by diffusers and fused, every step proven by ΔW.

Nothing is downloaded: the small models are built from configs with the real module names; the real-size
models (amused-256/amused-512 shapes, for validation) are built on the meta device from the published configs
the architecture generator cites (``tools/gen_architectures.py``).

Note: diffusers 0.42 deprecated ``AmusedPipeline`` and it no longer inherits the LoRA mixin; the saver it used
(and the one ``examples/amused/train_amused.py`` calls) is ``AmusedLoraLoaderMixin.save_lora_weights``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusers import UVit2DModel  # noqa: E402
from diffusers.loaders import AmusedLoraLoaderMixin  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: E402

import lorafmt  # noqa: E402
from lorafmt import architectures  # noqa: E402
from lorafmt.api import module_delta  # noqa: E402
from lorafmt.validate import FAMILY_NAMES  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
OTHER_FAMILIES = [f for f in architectures.families() if f != "amused"]

# A UVit2DModel small enough for CPU tests with every module of the real one (down/up-sampling stage included,
# as in amused-512); only the widths and depths differ.
SMALL_TRANSFORMER = {
    "hidden_size": 32,
    "use_bias": False,
    "hidden_dropout": 0.0,
    "cond_embed_dim": 16,
    "micro_cond_encode_dim": 2,
    "micro_cond_embed_dim": 10,
    "encoder_hidden_size": 16,
    "vocab_size": 32,
    "codebook_size": 16,
    "in_channels": 8,
    "block_out_channels": 8,
    "num_res_blocks": 1,
    "downsample": True,
    "upsample": True,
    "block_num_heads": 1,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "attention_dropout": 0.0,
    "intermediate_size": 16,
    "layer_norm_eps": 1e-6,
    "ln_elementwise_affine": True,
    "sample_size": 4,
}
SMALL_TEXT_ENCODER = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 16,
    "vocab_size": 100,
    "max_position_embeddings": 16,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
# What an aMUSEd LoRA trains (diffusers' examples/amused/train_amused.py targets the attention projections);
# a Linear of the ConvNeXt blocks and a 1x1 conv of the MLM head are added to cover both layer kinds.
TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "channelwise_linear_1", "mlm_layer.conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK = 4
TE_RANK = 2


def _generator():
    spec = importlib.util.spec_from_file_location("gen_architectures", REPO_ROOT / "tools" / "gen_architectures.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _small_transformer() -> UVit2DModel:
    torch.manual_seed(0)
    return UVit2DModel(**SMALL_TRANSFORMER).eval()


def _small_text_encoder() -> CLIPTextModelWithProjection:
    torch.manual_seed(1)
    return CLIPTextModelWithProjection(CLIPTextConfig(**SMALL_TEXT_ENCODER)).eval()


def _lora_layers(model) -> dict[str, LoraLayer]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}


def _peft_delta(layer: LoraLayer, adapter: str) -> np.ndarray:
    with torch.no_grad():
        return layer.get_delta_weight(adapter).float().numpy()


def _assert_same_delta(expected: np.ndarray, module) -> None:
    got = module_delta(module)
    assert got.shape == expected.shape or got.size == expected.size, (module.path, got.shape, expected.shape)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6, err_msg=module.path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small LoRA: peft on UVit2DModel + CLIPTextModelWithProjection, saved by AmusedLoraLoaderMixin."""
    tmp = tmp_path_factory.mktemp("amused")
    transformer = _small_transformer()
    base_state = {k: v.clone().contiguous() for k, v in transformer.state_dict().items()}
    torch.manual_seed(2)
    transformer = inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=TRANSFORMER_TARGETS), transformer
    )
    text_encoder = inject_adapter_in_model(
        LoraConfig(r=TE_RANK, lora_alpha=TE_RANK, init_lora_weights=False, target_modules=TEXT_TARGETS),
        _small_text_encoder(),
    )
    AmusedLoraLoaderMixin.save_lora_weights(
        tmp / "lora",
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
    )
    deltas = {f"transformer.{n}": _peft_delta(m, "default") for n, m in _lora_layers(transformer).items()}
    deltas.update({f"text_encoder.{n}": _peft_delta(m, "default") for n, m in _lora_layers(text_encoder).items()})
    return {
        "tmp": tmp,
        "path": tmp / "lora" / "pytorch_lora_weights.safetensors",
        "deltas": deltas,
        "base_state": base_state,
    }


def _real_size_lora(path: Path, variant: str, extra_targets: tuple[str, ...] = ()) -> Path:
    """A LoRA on the real-size aMUSEd models (built on the meta device), saved by AmusedLoraLoaderMixin."""
    gen = _generator()
    cfg = gen.AMUSED_256_TRANSFORMER if variant == "amused-256" else gen.AMUSED_512_TRANSFORMER
    with torch.device("meta"):
        transformer = UVit2DModel(**cfg)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**gen.AMUSED_CLIP_L))
    targets = [*TRANSFORMER_TARGETS, *extra_targets]
    transformer = inject_adapter_in_model(LoraConfig(r=RANK, target_modules=targets), transformer)
    text_encoder = inject_adapter_in_model(LoraConfig(r=TE_RANK, target_modules=TEXT_TARGETS), text_encoder)
    gen_rng = torch.Generator().manual_seed(3)

    def materialise(state):  # LoRA factors of the real shapes (the base weights stay on the meta device)
        return {k: torch.randn(v.shape, generator=gen_rng) * 0.01 for k, v in state.items()}

    AmusedLoraLoaderMixin.save_lora_weights(
        path,
        transformer_lora_layers=materialise(get_peft_model_state_dict(transformer)),
        text_encoder_lora_layers=materialise(get_peft_model_state_dict(text_encoder)),
    )
    return path / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def real_size(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("amused-real")
    return {
        "amused-256": _real_size_lora(tmp / "256", "amused-256"),
        # peft cannot wrap up_block.upsample.conv (a ConvTranspose2d); downsample.conv is a Conv2d
        "amused-512": _real_size_lora(tmp / "512", "amused-512", ("downsample.conv",)),
    }


# ----------------------------------------------------------------------------------------------- detection


def test_diffusers_file_is_detected_as_amused(small):
    det = lorafmt.detect(small["path"])
    assert det.layout == "diffusers" and det.family == "amused", det.family_evidence
    lora = lorafmt.read(small["path"])
    assert lora.family == "amused" and not lora.unplaced and not lora.issues
    assert set(lora.modules) == set(small["deltas"])
    assert lora.components == {
        "text_encoder": sum(p.startswith("text_encoder.") for p in small["deltas"]),
        "transformer": sum(p.startswith("transformer.") for p in small["deltas"]),
    }
    assert "transformer.transformer_layers.0.attn2.to_q" in lora.modules  # cross-attention that must not read as SD3
    assert "transformer.mlm_layer.conv1" in lora.modules


def test_read_delta_equals_peft_delta(small):
    """Every module's ΔW as lorafmt reads it equals PEFT's get_delta_weight on the model that made it."""
    lora = lorafmt.read(small["path"])
    for path, expected in small["deltas"].items():
        _assert_same_delta(expected, lora.modules[path])


def test_transformer_only_and_single_block_files_are_amused(small, tmp_path):
    """Detection needs no text encoder and no transformer_layers: any UVit2DModel root says aMUSEd."""
    tensors = load_file(small["path"])
    for keep in ("transformer.", "transformer.mlm_layer.", "transformer.down_block.attention_blocks.0.attn2."):
        part = {k: v for k, v in tensors.items() if k.startswith(keep)}
        save_file(part, tmp_path / "part.safetensors", metadata={"format": "pt"})
        det = lorafmt.detect(tmp_path / "part.safetensors")
        assert det.family == "amused", (keep, det.family_evidence)


def test_real_size_variants(real_size):
    det = lorafmt.detect(real_size["amused-512"])
    assert det.family == "amused" and "variant: amused-512" in det.family_evidence
    assert not any(e.startswith("variant:") for e in lorafmt.detect(real_size["amused-256"]).family_evidence)


def _text_encoder_only_lora(path: Path, targets: list[str]) -> Path:
    """A LoRA on aMUSEd's real-size text encoder only (CLIPTextModelWithProjection on the meta device)."""
    with torch.device("meta"):
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_generator().AMUSED_CLIP_L))
    state = get_peft_model_state_dict(inject_adapter_in_model(LoraConfig(r=TE_RANK, target_modules=targets), text_encoder))
    rng = torch.Generator().manual_seed(4)
    AmusedLoraLoaderMixin.save_lora_weights(
        path, text_encoder_lora_layers={k: torch.randn(v.shape, generator=rng) * 0.01 for k, v in state.items()}
    )
    return path / "pytorch_lora_weights.safetensors"


def test_text_encoder_only_file_says_it_fits_sd1_and_amused(tmp_path):
    """aMUSEd's text encoder is SD1's CLIP-L text tower, shape for shape: without a text_projection module the
    file cannot say which; sd1 stays the default and the evidence names aMUSEd and --family."""
    path = _text_encoder_only_lora(tmp_path / "te", TEXT_TARGETS)
    te_modules = architectures.load("amused").component_modules("text_encoder")
    assert te_modules.keys() - architectures.load("sd1").component_modules("text_encoder").keys() == {"text_projection"}
    det = lorafmt.detect(path)
    assert det.family == "sd1"
    assert any("sd1 and amused" in e and "--family" in e for e in det.family_evidence), det.family_evidence
    assert lorafmt.read(path, family="amused").family == "amused"
    report = lorafmt.validate(path, family="amused")
    assert report.valid, [f.line() for f in report.findings[:5]]


def test_text_encoder_only_file_with_text_projection_is_amused(tmp_path):
    """The text_projection exists in aMUSEd's CLIPTextModelWithProjection, not in SD1's CLIPTextModel."""
    path = _text_encoder_only_lora(tmp_path / "te", [*TEXT_TARGETS, "text_projection"])
    det = lorafmt.detect(path)
    assert det.family == "amused", det.family_evidence
    assert not any("sd1 and amused" in e for e in det.family_evidence)
    assert lorafmt.validate(path).valid


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("variant", ["amused-256", "amused-512"])
def test_real_shapes_validate_as_amused(real_size, variant):
    report = lorafmt.validate(real_size[variant], family="amused")
    assert report.findings == [], [f.line() for f in report.findings[:5]]
    assert report.valid and report.detected_family == "amused"
    if variant == "amused-512":
        assert report.variant == "amused-512"  # only it has the down/up-sampling convs


@pytest.mark.parametrize("other", OTHER_FAMILIES)
def test_real_shapes_fail_against_other_families(real_size, other):
    report = lorafmt.validate(real_size["amused-256"], family=other)
    assert not report.valid and report.exit_code == 1
    first = report.findings[0]
    assert first.code == "V107", [f.line() for f in report.findings[:3]]
    assert f"this is an {FAMILY_NAMES['amused']} LoRA" in first.message
    assert first.data["detected_family"] == "amused"


# ----------------------------------------------------------------------------------------------- conversion


def test_peft_round_trip_keeps_every_delta(small, tmp_path):
    peft_dir = tmp_path / "peft"
    report = lorafmt.convert(small["path"], peft_dir, to="peft")
    assert report.family == "amused" and report.modules == len(small["deltas"])
    assert sorted(p.name for p in peft_dir.iterdir()) == ["text_encoder", "transformer"]
    cfg = json.loads((peft_dir / "transformer" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == RANK
    back = tmp_path / "back.safetensors"
    lorafmt.convert(peft_dir, back, to="diffusers")
    for a, b in ((small["path"], peft_dir), (peft_dir, back), (small["path"], back)):
        d = lorafmt.diff(a, b)
        assert d.same, [m for m in d.differing][:3]
        assert len(d.modules) == len(small["deltas"])
    for src in (peft_dir, back):
        lora = lorafmt.read(src)
        assert lora.family == "amused"
        for path, expected in small["deltas"].items():
            _assert_same_delta(expected, lora.modules[path])


def test_bare_peft_transformer_file_places_uvit_modules(small, tmp_path):
    """A bare ``base_model.model.`` file (no folder to name the component) is placed on the transformer."""
    peft_dir = tmp_path / "peft"
    lorafmt.convert(small["path"], peft_dir, to="peft")
    lora = lorafmt.read(peft_dir / "transformer" / "adapter_model.safetensors")
    assert not lora.unplaced and lora.family == "amused"
    assert set(lora.modules) == {p for p in small["deltas"] if p.startswith("transformer.")}


def test_peft_folder_loads_with_peft(small, tmp_path):
    """The PEFT folder is what ``PeftModel.from_pretrained`` reads: same ΔW on a fresh UVit2DModel."""
    from peft import PeftModel

    peft_dir = tmp_path / "peft"
    lorafmt.convert(small["path"], peft_dir, to="peft")
    model = PeftModel.from_pretrained(_small_transformer(), peft_dir / "transformer")
    layers = _lora_layers(model.base_model.model)
    assert {f"transformer.{n}" for n in layers} == {p for p in small["deltas"] if p.startswith("transformer.")}
    for name, layer in layers.items():
        np.testing.assert_allclose(_peft_delta(layer, "default"), small["deltas"][f"transformer.{name}"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- diffusers load


def test_round_tripped_file_loads_into_transformer_with_same_delta(small, tmp_path):
    """diffusers' AmusedLoraLoaderMixin.load_lora_into_transformer reads the peft→diffusers round trip."""
    peft_dir = tmp_path / "peft"
    back = tmp_path / "back.safetensors"
    lorafmt.convert(small["path"], peft_dir, to="peft")
    lorafmt.convert(peft_dir, back, to="diffusers")
    state = load_file(back)
    from safetensors import safe_open

    with safe_open(back, "pt") as fh:
        metadata = json.loads(fh.metadata()["lora_adapter_metadata"])
    transformer = _small_transformer()
    AmusedLoraLoaderMixin.load_lora_into_transformer(state, None, transformer, adapter_name="rt", metadata=metadata)
    layers = _lora_layers(transformer)
    lora = lorafmt.read(back)
    assert {f"transformer.{n}" for n in layers} == {p for p in lora.modules if p.startswith("transformer.")}
    for name, layer in layers.items():
        delta = _peft_delta(layer, "rt")
        _assert_same_delta(delta, lora.modules[f"transformer.{name}"])
        np.testing.assert_allclose(delta, small["deltas"][f"transformer.{name}"], rtol=1e-5, atol=1e-6)


def test_alpha_survives_peft_to_diffusers_and_load(tmp_path):
    """A PEFT adapter with lora_alpha != r (saved by peft itself) converts to diffusers with its alpha in
    lora_adapter_metadata, and diffusers' loader rebuilds the same scaled ΔW."""
    model = peft.get_peft_model(
        _small_transformer(),
        LoraConfig(r=RANK, lora_alpha=3 * RANK, init_lora_weights=False, target_modules=["to_q", "to_v", "mlm_layer.conv1"]),
    )
    model.save_pretrained(tmp_path / "peft" / "transformer")
    expected = {f"transformer.{n}": _peft_delta(m, "default") for n, m in _lora_layers(model.base_model.model).items()}
    out = tmp_path / "diffusers.safetensors"
    lorafmt.convert(tmp_path / "peft", out, to="diffusers", family="amused")
    lora = lorafmt.read(out)
    assert lora.family == "amused" and set(lora.modules) == set(expected)
    for path, delta in expected.items():
        assert lora.modules[path].scale == 3.0
        _assert_same_delta(delta, lora.modules[path])
    from safetensors import safe_open

    with safe_open(out, "pt") as fh:
        metadata = json.loads(fh.metadata()["lora_adapter_metadata"])
    transformer = _small_transformer()
    AmusedLoraLoaderMixin.load_lora_into_transformer(load_file(out), None, transformer, adapter_name="a", metadata=metadata)
    for name, layer in _lora_layers(transformer).items():
        np.testing.assert_allclose(_peft_delta(layer, "a"), expected[f"transformer.{name}"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ fuse


@pytest.mark.parametrize("where", ["transformer/diffusion_pytorch_model.safetensors", "bare.safetensors"])
def test_fuse_into_transformer_file_is_base_plus_delta(small, tmp_path, where):
    """Fusing into a UVit2DModel component file (named by its folder, or by its keys alone) gives W + ΔW."""
    base = tmp_path / where
    base.parent.mkdir(parents=True, exist_ok=True)
    save_file(small["base_state"], base)
    out = tmp_path / "fused.safetensors"
    report = lorafmt.fuse(base, [(small["path"], 1.0)], out, device="cpu")
    assert report.components == ["transformer"]
    fused = load_file(out)
    assert set(fused) == set(small["base_state"])
    touched = set()
    for path, delta in small["deltas"].items():
        if not path.startswith("transformer."):
            continue
        key = path[len("transformer.") :] + ".weight"
        touched.add(key)
        want = small["base_state"][key].numpy() + delta.reshape(small["base_state"][key].shape)
        np.testing.assert_allclose(fused[key].numpy(), want, rtol=1e-5, atol=1e-6, err_msg=key)
    for key, value in small["base_state"].items():
        if key not in touched:
            assert torch.equal(fused[key], value), key


def test_fuse_into_pipeline_folder_fuses_transformer_and_text_encoder(small, tmp_path):
    """A diffusers aMUSEd pipeline folder: both LoRA components are fused at the given scale, W + s·ΔW."""
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "text_encoder").mkdir()
    te_state = {k: v.contiguous() for k, v in _small_text_encoder().state_dict().items()}
    save_file(small["base_state"], pipe / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(te_state, pipe / "text_encoder" / "model.safetensors")
    (pipe / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "AmusedPipeline",
                "transformer": ["diffusers", "UVit2DModel"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            }
        )
    )
    report = lorafmt.fuse(pipe, [(small["path"], 0.5)], tmp_path / "fused", device="cpu")
    assert report.components == ["text_encoder", "transformer"]
    files = {
        "transformer": (load_file(tmp_path / "fused" / "transformer" / "diffusion_pytorch_model.safetensors"), small["base_state"]),
        "text_encoder": (load_file(tmp_path / "fused" / "text_encoder" / "model.safetensors"), te_state),
    }
    for path, delta in small["deltas"].items():
        component, rel = path.split(".", 1)
        fused, base = files[component]
        key = rel + ".weight"
        want = base[key].numpy() + 0.5 * delta.reshape(base[key].shape)
        np.testing.assert_allclose(fused[key].numpy(), want, rtol=1e-5, atol=1e-6, err_msg=path)


def test_layouts_without_amused_refuse_rather_than_misspell(small, tmp_path):
    """Layouts that cannot spell UVit2DModel modules (kohya, comfyui, onetrainer, xlabs, bfl-control) refuse an
    aMUSEd file with a LorafmtError and write nothing; diffusers and peft declare the family."""
    from lorafmt.errors import LorafmtError
    from lorafmt.layouts import available_layouts

    writable = [lay for lay in available_layouts() if lay.capabilities.writable]
    assert {"diffusers", "peft"} <= {lay.name for lay in writable if "amused" in lay.capabilities.families}
    for lay in writable:
        if "amused" in lay.capabilities.families:
            continue
        dst = tmp_path / f"{lay.name}.safetensors"
        with pytest.raises(LorafmtError):
            lorafmt.convert(small["path"], dst, to=lay.name)
        assert not dst.exists(), lay.name


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_kohya_and_comfyui_refusals_point_to_diffusers_not_to_family(small, tmp_path, layout):
    """aMUSEd's family is known, so "pass --family flux1 or sd3" would be wrong: the hint names the layouts that
    spell UVit2DModel modules."""
    from lorafmt.errors import UnsupportedFeatureError

    with pytest.raises(UnsupportedFeatureError) as info:
        lorafmt.convert(small["path"], tmp_path / "out.safetensors", to=layout)
    assert "'amused'" in info.value.message or "aMUSEd" in info.value.message
    assert "diffusers or peft" in info.value.hint and "--family" not in info.value.hint


def test_kohya_without_a_family_names_the_transformer_families(small, tmp_path):
    """Transformer modules of no known family: --family flux1/sd3 is the fix, and aMUSEd is named as not kohya."""
    from lorafmt.errors import UnsupportedFeatureError
    from lorafmt.layouts import get_layout
    from lorafmt.layouts._base import WriteOptions

    lora = lorafmt.read(small["path"]).model_copy(update={"family": None})
    with pytest.raises(UnsupportedFeatureError) as info:
        get_layout("kohya").plan(lora, WriteOptions())
    assert "--family flux1 or --family sd3" in info.value.hint and "aMUSEd" in info.value.hint
