"""Core layouts: kohya / diffusers / diffusers-legacy / peft read, write and convert with exact ΔW."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lorafmt
from lorafmt.errors import LossyConversionError, OutputExistsError, UnplacedKeysError
from builders import FAMILY_MODULES, sample_lora

WRITABLE = ["kohya", "diffusers", "peft"]


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def family(request):
    return request.param


def _write(lora, tmp_path: Path, layout: str) -> Path:
    dst = tmp_path / (f"{layout}_out" if layout == "peft" else f"{layout}.safetensors")
    lorafmt.write(lora, dst, layout=layout)
    return dst


@pytest.mark.parametrize("layout", WRITABLE)
def test_write_read_keeps_every_module_and_delta(tmp_path, family, layout):
    lora = sample_lora(family)
    dst = _write(lora, tmp_path, layout)
    back = lorafmt.read(dst)
    assert back.provenance.layout == layout
    assert back.family == family
    assert set(back.modules) == set(lora.modules)
    report = lorafmt.diff(lora, back, rtol=0.0)
    assert report.same, report.differing
    for path, m in lora.modules.items():
        assert back.modules[path].scale == pytest.approx(m.scale)


@pytest.mark.parametrize("src_layout", WRITABLE)
@pytest.mark.parametrize("dst_layout", WRITABLE)
def test_convert_every_pair_is_exact(tmp_path, family, src_layout, dst_layout):
    lora = sample_lora(family, seed=3)
    src = _write(lora, tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path, src_layout)
    dst = tmp_path / (f"conv_{dst_layout}" if dst_layout == "peft" else f"conv_{dst_layout}.safetensors")
    report = lorafmt.convert(src, dst, to=dst_layout)
    assert report.modules == len(lora.modules)
    # pure renames: no tensor value is recomputed (only alpha scalars may be written anew)
    assert report.bytes_computed <= 4 * len(lora.modules)
    assert lorafmt.diff(src, dst, rtol=0.0).same


def test_kohya_roundtrip_is_byte_identical(tmp_path, family):
    src = _write(sample_lora(family), tmp_path, "kohya")
    again = tmp_path / "again.safetensors"
    lorafmt.convert(src, again, to="kohya")
    assert src.read_bytes() == again.read_bytes()


def test_sdxl_kohya_uses_sgm_names(tmp_path):
    dst = _write(sample_lora("sdxl"), tmp_path, "kohya")
    keys = set(load_file(dst))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in keys  # up_blocks.0.upsamplers.0.conv
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in keys  # down_blocks.0.downsamplers.0.conv
    assert "lora_unet_middle_block_2_emb_layers_1.alpha" in keys or "lora_unet_middle_block_2_emb_layers_1.lora_down.weight" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_k_proj") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_31_mlp_fc1") for k in keys)


def test_sd1_kohya_names_and_alpha_tensor(tmp_path):
    dst = _write(sample_lora("sd1"), tmp_path, "kohya")
    sd = load_file(dst)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{key}.alpha"].shape == () and float(sd[f"{key}.alpha"]) == 2.0
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha" not in sd  # alpha None stays absent
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd


def test_sd2_projection_factor_shapes(tmp_path):
    """sd-scripts builds SD2 with 1x1-conv projections (4-D factors); diffusers/PEFT need 2-D Linear factors."""
    lora = sample_lora("sd2")
    kohya = _write(lora, tmp_path, "kohya")
    sd = load_file(kohya)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 320, 1, 1)
    diff_path = tmp_path / "d.safetensors"
    lorafmt.convert(kohya, diff_path, to="diffusers")
    sd2 = load_file(diff_path)
    assert sd2["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"].shape == (4, 320)
    assert lorafmt.diff(kohya, diff_path).same


def test_diffusers_alpha_travels_in_adapter_metadata(tmp_path):
    dst = _write(sample_lora("sd1"), tmp_path, "diffusers")
    from safetensors import safe_open

    with safe_open(str(dst), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4
    # alphas 2, None(=4), 1.5, 4 cycle over the modules: the most common becomes lora_alpha, others patterns
    assert cfg["unet.lora_alpha"] == 4
    assert any(v == 2 for v in cfg["unet.alpha_pattern"].values())
    assert any(v == 1.5 for v in cfg["unet.alpha_pattern"].values())


def test_peft_folder_layout(tmp_path):
    dst = _write(sample_lora("sdxl"), tmp_path, "peft")
    assert sorted(p.name for p in dst.iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    cfg = json.loads((dst / "unet" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    keys = load_file(dst / "unet" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in keys)
    te_keys = load_file(dst / "text_encoder" / "adapter_model.safetensors")
    # transformers 5 CLIP module names (no text_model level)
    assert all(k.startswith("base_model.model.encoder.layers.") for k in te_keys)


def test_legacy_attn_processor_file_reads(tmp_path):
    rng = np.random.default_rng(0)
    sd = {}
    base = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    for proj, shape in (("to_q", (320, 320)), ("to_out", (320, 320))):
        sd[f"{base}.{proj}_lora.down.weight"] = rng.standard_normal((4, shape[1])).astype(np.float32)
        sd[f"{base}.{proj}_lora.up.weight"] = rng.standard_normal((shape[0], 4)).astype(np.float32)
    sd["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight"] = rng.standard_normal((4, 768)).astype(np.float32)
    sd["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight"] = rng.standard_normal((1280, 4)).astype(np.float32)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight"] = rng.standard_normal((4, 768)).astype(np.float32)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight"] = rng.standard_normal((768, 4)).astype(np.float32)
    path = tmp_path / "legacy.safetensors"
    save_file(sd, path)
    lora = lorafmt.read(path)
    assert lora.provenance.layout == "diffusers-legacy"
    assert lora.family == "sd1"
    assert set(lora.modules) == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    }
    out = tmp_path / "modern.safetensors"
    lorafmt.convert(path, out, to="diffusers")
    assert lorafmt.diff(path, out, rtol=0.0).same


def test_transformers5_clip_spelling_is_accepted(tmp_path):
    rng = np.random.default_rng(1)
    sd = {
        "lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight": rng.standard_normal((4, 768)).astype(np.float16),
        "lora_te_encoder_layers_0_self_attn_q_proj.lora_up.weight": rng.standard_normal((768, 4)).astype(np.float16),
    }
    lora = lorafmt.read(sd)
    assert list(lora.modules) == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    out = tmp_path / "k.safetensors"
    lorafmt.write(lora, out, layout="kohya")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in load_file(out)


def test_convert_refuses_unplaced_keys_and_keeps_output(tmp_path):
    src = _write(sample_lora("sd1"), tmp_path, "kohya")
    sd = load_file(src)
    sd["bundle_emb.mytoken.string_to_param.*"] = np.zeros((1, 768), np.float16)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        lorafmt.convert(bad, out, to="diffusers")
    with pytest.raises(UnplacedKeysError) as exc:
        lorafmt.convert(bad, out, to="diffusers", force=True)
    assert "bundle_emb" in str(exc.value)
    assert out.read_bytes() == b"keep me"
    report = lorafmt.convert(bad, out, to="diffusers", force=True, strict=False)
    assert any(n.key and "bundle_emb" in n.key for n in report.notes)


def test_lossy_write_refused_then_reported(tmp_path):
    lora = sample_lora("sd1")
    path = next(iter(lora.modules))
    m = lora.modules[path]
    from lorafmt.schema import TensorRef

    # an input-axis DoRA magnitude (OneTrainer/LyCORIS wd_on_out=False) has no diffusers spelling
    # (a Tucker lora_mid no longer serves here: it is folded exactly into a k×k lora_A)
    n_in = m.tensors["down"].shape[1]
    m.dora_scale = TensorRef.from_array("dora_scale", np.ones((1, n_in), np.float32), "F16")
    m.dora_axis = "in"
    with pytest.raises(LossyConversionError):
        lorafmt.write(lora, tmp_path / "x.safetensors", layout="diffusers")
    assert not (tmp_path / "x.safetensors").exists()
    report = lorafmt.write(lora, tmp_path / "x.safetensors", layout="diffusers", allow_lossy=True)
    assert [n.module for n in report.notes] == [path]


@pytest.mark.parametrize("allow_lossy", [False, True])
def test_comfyui_refuses_sd_family_and_points_to_kohya(tmp_path, family, allow_lossy, capsys):
    """ComfyUI loads SD1/SD2/SDXL LoRAs in the kohya spelling; its Flux/SD3 layout says so instead of offering to
    drop every U-Net module (or, with --allow-lossy, to pass --family flux1/sd3)."""
    from lorafmt.cli import main
    from lorafmt.errors import UnsupportedFeatureError

    src = _write(sample_lora(family), tmp_path, "diffusers")
    dst = tmp_path / "comfy.safetensors"
    with pytest.raises(UnsupportedFeatureError) as info:
        lorafmt.convert(src, dst, to="comfyui", allow_lossy=allow_lossy)
    assert "--to kohya" in info.value.hint and info.value.file == str(src)
    argv = ["convert", str(src), "--to", "comfyui", "-o", str(dst), *(["--allow-lossy"] if allow_lossy else [])]
    assert main(argv) == 2
    assert "hint: ComfyUI loads SD1/SD2/SDXL LoRAs as kohya: use --to kohya" in capsys.readouterr().err
    assert not dst.exists()


@pytest.mark.parametrize("layout", ["xlabs", "bfl-control", "onetrainer"])
@pytest.mark.parametrize("allow_lossy", [False, True])
def test_flux_only_layouts_refuse_sd_family_and_name_the_layouts_that_hold_it(tmp_path, family, layout, allow_lossy, capsys):
    """Flux.1/SD3-only layouts refuse an SD1/SD2/SDXL LoRA up front instead of offering --allow-lossy (which would
    drop every module, and used to write an empty file)."""
    from lorafmt.cli import main
    from lorafmt.errors import UnsupportedFeatureError

    src = _write(sample_lora(family), tmp_path, "kohya")
    dst = tmp_path / "out.safetensors"
    with pytest.raises(UnsupportedFeatureError) as info:
        lorafmt.convert(src, dst, to=layout, allow_lossy=allow_lossy)
    assert f"family is {family!r}" in info.value.message and info.value.file == str(src)
    assert "kohya, diffusers or peft" in info.value.hint and "--allow-lossy" not in info.value.hint
    assert not dst.exists()
    argv = ["convert", str(src), "--to", layout, "-o", str(dst), *(["--allow-lossy"] if allow_lossy else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"lorafmt: error: the {layout} layout writes") and f"family is {family!r}" in err[0]
    assert err[1] == "hint: SD1/SD2/SDXL LoRAs are written as kohya, diffusers or peft: use --to kohya"
    assert not dst.exists()


def _kohya_text_encoder_only(path: Path, prefix: str, metadata: dict[str, str] | None = None) -> Path:
    """A kohya LoRA on the CLIP-L (768-wide) text encoder only, as sd-scripts writes it."""
    rng = np.random.default_rng(5)
    tensors = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        name = f"{prefix}_text_model_encoder_layers_0_self_attn_{proj}"
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((4, 768)).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = rng.standard_normal((768, 4)).astype(np.float32)
        tensors[f"{name}.alpha"] = np.asarray(4.0, dtype=np.float32)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "metadata",
    [
        {"ss_base_model_version": "sdxl_base_v1-0"},
        {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
        None,  # lora_te1_ alone: only multi-encoder models number their text encoders, and SDXL is the U-Net one
    ],
)
def test_kohya_text_encoder_1_only_is_sdxl_not_sd1(tmp_path, metadata):
    """SDXL's text encoder 1 is CLIP-L, shape for shape SD1's; the lora_te1_ name (SD1 files say lora_te_) and the
    metadata outweigh the width, and the evidence says so."""
    path = _kohya_text_encoder_only(tmp_path / "te1.safetensors", "lora_te1", metadata)
    lora = lorafmt.read(path)
    assert lora.family == "sdxl", lora.provenance.evidence
    assert any("lora_te1_" in e and e.endswith("-> sdxl") for e in lora.provenance.evidence), lora.provenance.evidence
    assert set(lora.components) == {"text_encoder"}
    assert lorafmt.detect(path).family == "sdxl"


def test_kohya_text_encoder_1_only_follows_flux_metadata(tmp_path):
    path = _kohya_text_encoder_only(tmp_path / "te1.safetensors", "lora_te1", {"modelspec.architecture": "flux-1-dev/lora"})
    assert lorafmt.read(path).family == "flux1"


def test_kohya_sd1_text_encoder_only_stays_sd1(tmp_path):
    path = _kohya_text_encoder_only(tmp_path / "te.safetensors", "lora_te")
    lora = lorafmt.read(path)
    assert lora.family == "sd1", lora.provenance.evidence
    assert not any("lora_te1_" in e for e in lora.provenance.evidence)


def test_convert_onto_own_path(tmp_path):
    src = _write(sample_lora("sdxl"), tmp_path, "kohya")
    before = lorafmt.read(src)
    ref = {p: lorafmt.api.module_delta(m) for p, m in before.modules.items()}
    lorafmt.convert(src, src, to="diffusers", force=True)
    after = lorafmt.read(src)
    assert after.provenance.layout == "diffusers"
    for p, d in ref.items():
        np.testing.assert_array_equal(lorafmt.api.module_delta(after.modules[p]), d)


def test_dtype_cast_on_write(tmp_path):
    src = _write(sample_lora("sd1"), tmp_path, "kohya")
    out = tmp_path / "bf16.safetensors"
    report = lorafmt.convert(src, out, to="diffusers", dtype="bf16")
    assert report.bytes_computed > 0
    info = lorafmt.inspect(out)
    assert set(info["dtypes"]) == {"BF16"}
    assert lorafmt.diff(src, out, rtol=1e-2).same


def test_every_family_module_table_is_placed(family):
    lora = sample_lora(family)
    assert set(lora.modules) == set(FAMILY_MODULES[family])
