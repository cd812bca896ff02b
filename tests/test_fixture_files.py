"""The committed fixture files: present, valid, made by the tools they claim, and reproducible.

* ``fixtures/tools/``      -- written by LyCORIS / PEFT / diffusers (``fixtures/make_tool_fixtures.py``)
* ``fixtures/generated/``  -- real-shape kohya/diffusers files (``fixtures/make_fixtures.py``, numpy only)
* ``fixtures/manifests.py`` -- corpus manifest -> .safetensors helper

Fast tests need only numpy + safetensors. Tests that import torch/diffusers/peft/lycoris are marked ``parity``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fixtures import make_fixtures
from fixtures.manifests import (
    CORPUS_DIR,
    content_sha256,
    load_manifest,
    manifest_nbytes,
    manifest_to_safetensors,
)

TOOLS = REPO / "fixtures" / "tools"
GENERATED = REPO / "fixtures" / "generated"
TOOL_MANIFEST = json.loads((TOOLS / "manifest.json").read_text(encoding="utf-8"))
TOOL_FIXTURES = {fx["name"]: fx for fx in TOOL_MANIFEST["fixtures"]}
GEN_INDEX = json.loads((GENERATED / "index.json").read_text(encoding="utf-8"))

_DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def raw_header(path: Path) -> tuple[dict, int]:
    """(header dict incl. __metadata__, data start) read with nothing but struct/json."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


def check_safetensors(path: Path) -> dict:
    """Assert ``path`` is a well-formed safetensors file (contiguous, in-bounds offsets); return its header."""
    header, start = raw_header(path)
    size = path.stat().st_size
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k, v) for k, v in header.items() if k != "__metadata__")
    pos = 0
    for begin, end, key, v in spans:
        assert begin == pos, f"{path.name}: gap/overlap before {key}"
        assert end - begin == math.prod(v["shape"]) * _DTYPE_SIZES[v["dtype"]], key
        pos = end
    assert start + pos == size, f"{path.name}: data size {pos} != file size {size - start}"
    meta = header.get("__metadata__", {})
    assert all(isinstance(v, str) for v in meta.values())
    # and the reference implementation agrees
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        assert set(f.keys()) == {k for k in header if k != "__metadata__"}
        assert (f.metadata() or {}) == meta
    return header


def tool_files() -> list[tuple[str, str]]:
    return [(name, rel) for name, fx in TOOL_FIXTURES.items() for rel in fx["files"]]


def tool_safetensors(name: str) -> list[Path]:
    return [TOOLS / rel for rel in TOOL_FIXTURES[name]["files"] if rel.endswith(".safetensors")]


def _versions_match() -> bool:
    recorded = TOOL_MANIFEST["versions"]
    for dist, version in recorded.items():
        if dist == "python":
            continue
        try:
            if md.version(dist) != version:
                return False
        except md.PackageNotFoundError:
            return False
    return True


# ============================================================================================ tool fixtures


def test_tool_fixture_set_is_complete():
    expected = {
        "lycoris_locon_sd1",
        "lycoris_locon-tucker_sd1",
        "lycoris_loha_sd1",
        "lycoris_loha-tucker_sd1",
        "lycoris_lokr_sd1",
        "lycoris_lokr-tucker_sd1",
        "lycoris_lokr-fullmatrix_sd1",
        "lycoris_full_sd1",
        "lycoris_norm_sd1",
        "lycoris_ia3_sd1",
        "lycoris_diag-oft_sd1",
        "lycoris_dora_sd1",
        "lycoris_locon_sd1_te-tf5-names",
        "diffusers_lora_sd1",
        "diffusers-legacy_lora_sd1",
        "diffusers_lora-patterns_sd1",
        "diffusers_dora_sd1",
        "diffusers_lora_sdxl",
        "peft_lora_sd1",
    }
    assert set(TOOL_FIXTURES) == expected
    for name in ("sd1_unet", "sd1_text_encoder", "sdxl_unet", "sdxl_text_encoder", "sdxl_text_encoder_2"):
        cfg = json.loads((TOOLS / "configs" / f"{name}.json").read_text())
        assert cfg["class"] and cfg["config"]
    total = sum(rec["bytes"] for fx in TOOL_FIXTURES.values() for rec in fx["files"].values())
    assert total < 5_000_000


@pytest.mark.parametrize(("name", "rel"), tool_files())
def test_tool_fixture_file_is_intact(name, rel):
    path = TOOLS / rel
    rec = TOOL_FIXTURES[name]["files"][rel]
    assert path.is_file(), f"missing {rel}: rerun fixtures/make_tool_fixtures.py"
    assert path.stat().st_size == rec["bytes"]
    assert content_sha256(path) == rec["content_sha256"], f"{rel} changed since generation"
    if path.suffix == ".safetensors":
        header = check_safetensors(path)
        assert len(header) - ("__metadata__" in header) == rec["keys"]


@pytest.mark.parametrize("name", [n for n in TOOL_FIXTURES if n.startswith("lycoris_")])
def test_lycoris_fixture_metadata_and_keys(name):
    fx = TOOL_FIXTURES[name]
    (path,) = tool_safetensors(name)
    header, _ = raw_header(path)
    meta = header.pop("__metadata__")
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["sshs_model_hash"].startswith("0x")  # written by LycorisNetworkKohya.save_weights
    args = json.loads(meta["ss_network_args"])
    assert args["preset"].startswith("fixtures/tools/presets/")
    assert (REPO / args["preset"]).is_file()
    assert {v["dtype"] for v in header.values()} == {"F16"}
    prefixes = {k.split("_", 2)[1] for k in header}
    assert prefixes <= {"unet", "te"}
    assert ("te" in prefixes) == ("text_encoder" in fx["components"])
    te_keys = [k for k in header if k.startswith("lora_te_")]
    if name.endswith("te-tf5-names"):
        assert te_keys and all(k.startswith("lora_te_encoder_layers_") for k in te_keys)
    else:
        assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)
    params = {k.split(".", 1)[1] for k in header}
    expect = {
        "lycoris_locon_sd1": {"lora_down.weight", "lora_up.weight", "alpha"},
        "lycoris_locon-tucker_sd1": {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"},
        "lycoris_loha_sd1": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lycoris_loha-tucker_sd1": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
        "lycoris_lokr_sd1": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
        "lycoris_lokr-tucker_sd1": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
        "lycoris_lokr-fullmatrix_sd1": {"lokr_w1", "lokr_w2", "alpha"},
        "lycoris_full_sd1": {"diff", "diff_b"},
        "lycoris_norm_sd1": {"lora_down.weight", "lora_up.weight", "alpha", "w_norm", "b_norm"},
        "lycoris_ia3_sd1": {"weight", "on_input"},
        "lycoris_diag-oft_sd1": {"oft_blocks", "rescale", "alpha"},
        "lycoris_dora_sd1": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
        "lycoris_locon_sd1_te-tf5-names": {"lora_down.weight", "lora_up.weight", "alpha"},
    }[name]
    assert params == expect
    for k, v in header.items():
        if k.endswith((".alpha", ".on_input")):
            assert v["shape"] == []
        if k.endswith(".weight") and name == "lycoris_ia3_sd1":  # IA3 vector: input side for ff.net.2 / fc2
            on_input = k.endswith(("ff_net_2.weight", "mlp_fc2.weight"))
            assert v["shape"] == [32 if on_input else 8] or not k.startswith("lora_unet_down_blocks_0_"), k
        if k.endswith(".dora_scale"):  # wd_on_output=True: per output row
            assert v["shape"][0] > 1 and all(d == 1 for d in v["shape"][1:])


def test_lycoris_alpha_values():
    """Alpha is a 0-d F16 tensor: 2.0 for Linear/1x1 (network_alpha), 1.0 for 3x3 convs (conv_alpha)."""
    from safetensors import safe_open

    with safe_open(str(TOOLS / "lycoris_locon_sd1.safetensors"), "np") as f:
        keys = set(f.keys())
        for k in keys:
            if not k.endswith(".alpha"):
                continue
            down = f.get_slice(k.replace(".alpha", ".lora_down.weight")).get_shape()
            alpha = float(f.get_tensor(k))
            expected = 1.0 if len(down) == 4 and down[2:] != [1, 1] else 2.0
            assert alpha == expected, k
    with safe_open(str(TOOLS / "lycoris_lokr-fullmatrix_sd1.safetensors"), "np") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}  # noqa: SIM118
        assert alphas == {4.0}  # LyCORIS forces alpha = rank when w1 and w2 are both full


@pytest.mark.parametrize("name", [n for n, fx in TOOL_FIXTURES.items() if fx["layout"] != "kohya"])
def test_peft_and_diffusers_fixture_metadata_and_keys(name):
    fx = TOOL_FIXTURES[name]
    for path in tool_safetensors(name):
        header, _ = raw_header(path)
        meta = header.pop("__metadata__")
        assert meta["format"] == "pt"
        assert {v["dtype"] for v in header.values()} == {fx["dtype"]}
        if fx["layout"] == "peft":
            assert set(meta) == {"format"}
            assert all(k.startswith("base_model.model.") for k in header)
            cfg = json.loads((path.parent / "adapter_config.json").read_text())
            assert cfg["peft_type"] == "LORA" and cfg["init_lora_weights"] is False
            assert cfg["auto_mapping"]["base_model_class"] in ("UNet2DConditionModel", "CLIPTextModel")
            continue
        comps = {k.split(".", 1)[0] for k in header}
        assert comps == set(fx["components"])
        if fx["layout"] == "diffusers-legacy":
            assert set(meta) == {"format"}
            assert any(".lora.down.weight" in k for k in header)
            assert any(".lora_linear_layer.up.weight" in k for k in header)
            assert any(k.endswith(".fc1.lora_A.weight") for k in header)  # not covered by PEFT_TO_DIFFUSERS
            continue
        lam = json.loads(meta["lora_adapter_metadata"])
        for comp in fx["components"]:
            assert isinstance(lam[f"{comp}.r"], int) and f"{comp}.lora_alpha" in lam
            assert lam[f"{comp}.peft_type"] == "LORA"
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")) for k in header)
        assert fx["dora"] == any(k.endswith(".lora_magnitude_vector") for k in header)
        te = [k for k in header if k.startswith("text_encoder.")]
        assert te and all(k.startswith("text_encoder.encoder.layers.") for k in te)  # transformers 5 CLIPTextModel
        te2 = [k for k in header if k.startswith("text_encoder_2.")]
        assert all(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in te2)


def test_diffusers_rank_and_alpha_patterns_are_in_the_file():
    header, _ = raw_header(TOOLS / "diffusers_lora-patterns_sd1.safetensors")
    lam = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    assert lam["unet.rank_pattern"] == {"^down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 8, "conv2": 2}
    assert lam["unet.alpha_pattern"] == {"attn2.to_k": 16, "^mid_block.attentions.0.proj_in": 1}
    a = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert header[a]["shape"] == [8, 16]
    assert header["unet.down_blocks.1.resnets.0.conv2.lora_A.weight"]["shape"] == [2, 16, 3, 3]
    assert header["unet.down_blocks.1.resnets.0.conv2.lora_B.weight"]["shape"] == [16, 2, 1, 1]
    assert header["text_encoder.encoder.layers.11.mlp.fc2.lora_A.weight"]["shape"] == [2, 32]


# -------------------------------------------------------------------------- tool fixtures vs the live tools


def _torch_modules():
    for mod in ("torch", "diffusers", "transformers", "peft", "lycoris"):
        pytest.importorskip(mod)


@pytest.mark.parity
@pytest.mark.parametrize("name", [n for n in TOOL_FIXTURES if n.startswith("lycoris_")])
def test_lycoris_fixture_equals_rebuilt_network(name):
    """The file holds exactly what the rebuilt LyCORIS network's state_dict holds (rounded to fp16)."""
    _torch_modules()
    import torch
    from safetensors.torch import load_file

    from fixtures.make_tool_fixtures import lycoris_network

    net, _, _ = lycoris_network(name, round_to_saved=True)
    live = {k: v.detach().to(torch.float16) for k, v in net.state_dict().items()}
    saved = load_file(str(TOOLS / f"{name}.safetensors"))
    assert set(live) == set(saved)
    for k, v in saved.items():
        if k.endswith((".diff", ".diff_b")):  # fp16(weight - original) vs fp16(fp16(weight) - original)
            torch.testing.assert_close(live[k].float(), v.float(), atol=2e-3, rtol=0)
        else:
            assert torch.equal(live[k], v), k
    zero = [k for k, v in saved.items() if not k.endswith((".alpha", ".on_input")) and not v.abs().max() > 0]
    assert zero == []  # randomised: no zero-initialised factor left


@pytest.mark.parity
@pytest.mark.parametrize("name", [n for n in TOOL_FIXTURES if not n.startswith("lycoris_")])
def test_peft_fixture_equals_rebuilt_adapters(name):
    _torch_modules()
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from fixtures.make_tool_fixtures import peft_models

    fx = TOOL_FIXTURES[name]
    models = peft_models(name)
    for comp, model in models.items():
        sd = get_peft_model_state_dict(model)
        if fx["layout"] == "peft":
            saved = load_file(str(TOOLS / fx["path"] / comp / "adapter_model.safetensors"))  # PeftModel: prefixed
        else:
            if fx["layout"] == "diffusers-legacy":
                sd = convert_state_dict_to_diffusers(sd)
            saved = {
                k.removeprefix(f"{comp}."): v
                for k, v in load_file(str(TOOLS / fx["path"])).items()
                if k.startswith(f"{comp}.")
            }
        assert set(sd) == set(saved), comp
        for k, v in saved.items():
            assert torch.equal(sd[k].contiguous(), v), k


@pytest.mark.parity
def test_peft_dir_loads_with_peft_from_pretrained():
    _torch_modules()
    import torch
    from peft import PeftModel

    from fixtures.make_tool_fixtures import build_sd1, peft_models

    ref = peft_models("peft_lora_sd1")
    unet, te = build_sd1(te_text_model=False)
    for comp, base in (("unet", unet), ("text_encoder", te)):
        loaded = PeftModel.from_pretrained(base, str(TOOLS / "peft_lora_sd1" / comp))
        a = dict(loaded.named_parameters())
        for k, v in ref[comp].named_parameters():
            if "lora_" in k:
                assert torch.equal(a[k], v), k


@pytest.mark.parity
def test_diffusers_files_load_with_diffusers():
    """diffusers' own loaders accept each diffusers file (U-Net and text encoder, with lora_adapter_metadata) and
    end up with the adapters the fixture was made from."""
    _torch_modules()
    import torch
    from diffusers import StableDiffusionPipeline

    from fixtures.make_tool_fixtures import build_sd1, peft_models

    def adapter_params(model, name):
        tag = f".{name}."
        return {k.replace(tag, "."): v for k, v in model.named_parameters() if tag in k}

    for name in ("diffusers_lora_sd1", "diffusers_lora-patterns_sd1", "diffusers_dora_sd1"):
        path = str(TOOLS / f"{name}.safetensors")
        sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(path, return_lora_metadata=True)
        assert alphas is None
        unet, te = build_sd1(te_text_model=False)
        unet.load_lora_adapter(sd, prefix="unet", metadata=meta, adapter_name="x")
        StableDiffusionPipeline.load_lora_into_text_encoder(
            sd, None, te, prefix="text_encoder", metadata=meta, adapter_name="x"
        )
        ref = peft_models(name)
        for comp, model in (("unet", unet), ("text_encoder", te)):
            cfg, ref_cfg = model.peft_config["x"], ref[comp].peft_config["default"]
            for attr in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_dora"):
                assert getattr(cfg, attr) == getattr(ref_cfg, attr), (name, comp, attr)
            got, want = adapter_params(model, "x"), adapter_params(ref[comp], "default")
            assert set(got) == set(want)
            for k, v in want.items():
                if comp == "text_encoder" and "lora_magnitude_vector" in k:
                    # transformers 5.24 load_adapter (+ peft 0.21) reports the file's `...lora_magnitude_vector`
                    # keys as UNEXPECTED and re-initialises the magnitudes: diffusers silently loses a text-encoder
                    # DoRA magnitude. The U-Net path (diffusers' own load_lora_adapter) keeps it.
                    continue
                assert torch.equal(got[k].to(v.dtype), v), k


def _regenerate(out: Path) -> None:
    _torch_modules()
    if not _versions_match():
        pytest.skip(f"library versions differ from those recorded in manifest.json: {TOOL_MANIFEST['versions']}")
    cmd = [sys.executable, str(REPO / "fixtures" / "make_tool_fixtures.py"), "--out", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, timeout=900)


@pytest.mark.parity
def test_some_tool_fixtures_regenerate_identically(tmp_path):
    """Fast determinism check, in-process: fixtures whose bytes do not depend on PYTHONHASHSEED (no PEFT
    ``target_modules`` set in their metadata) are regenerated and compared."""
    _torch_modules()
    if not _versions_match():
        pytest.skip(f"library versions differ from those recorded in manifest.json: {TOOL_MANIFEST['versions']}")
    from fixtures.make_tool_fixtures import generate

    names = ["lycoris_ia3_sd1", "lycoris_lokr_sd1", "diffusers-legacy_lora_sd1"]
    generate(tmp_path, names)
    for name in names:
        for rel in TOOL_FIXTURES[name]["files"]:
            assert content_sha256(tmp_path / rel) == TOOL_FIXTURES[name]["files"][rel]["content_sha256"], rel


@pytest.mark.parity
@pytest.mark.slow
def test_tool_fixtures_regenerate_identically(tmp_path):
    """Rerunning make_tool_fixtures.py reproduces every file's content (and the README/manifest/configs)."""
    _regenerate(tmp_path)
    new = json.loads((tmp_path / "manifest.json").read_text())
    assert new["fixtures"] == TOOL_MANIFEST["fixtures"]
    for rel in [
        "README.md",
        *(f"configs/{p.name}" for p in (TOOLS / "configs").iterdir()),
        *(f"presets/{p.name}" for p in (TOOLS / "presets").iterdir()),
    ]:
        assert (tmp_path / rel).read_text() == (TOOLS / rel).read_text(), rel
    for name, rel in tool_files():
        assert content_sha256(tmp_path / rel) == content_sha256(TOOLS / rel), rel


# ============================================================================================ generated files


def test_generated_files_match_index():
    names = {p.name for p in GENERATED.glob("*.safetensors")}
    assert names == {f["file"] for f in GEN_INDEX["files"]}
    assert sum(f["bytes"] for f in GEN_INDEX["files"]) < 1_000_000
    for f in GEN_INDEX["files"]:
        path = GENERATED / f["file"]
        header = check_safetensors(path)
        meta = header.pop("__metadata__", None)
        assert meta == f["metadata"]
        assert content_sha256(path) == f["content_sha256"]
        assert {v["dtype"] for v in header.values()} == {f["dtype"]}
        n_alpha = sum(k.endswith(".alpha") for k in header)
        assert len(header) == 2 * len(f["modules"]) + n_alpha


def test_generated_files_regenerate_byte_identically(tmp_path):
    make_fixtures.generate(tmp_path)
    for f in GEN_INDEX["files"]:
        assert (tmp_path / f["file"]).read_bytes() == (GENERATED / f["file"]).read_bytes(), f["file"]
    assert json.loads((tmp_path / "index.json").read_text()) == GEN_INDEX


def test_generated_alphas_and_ranks():
    from safetensors import safe_open

    for f in GEN_INDEX["files"]:
        if f["dtype"] == "BF16":
            continue  # numpy cannot decode bf16 through safe_open; covered by the F16/F32 files
        with safe_open(str(GENERATED / f["file"]), "np") as st:
            keys = set(st.keys())
            for rec in f["modules"]:
                m = rec["module"]
                down = f"{m}.lora_down.weight" if f["layout"] == "kohya" else f"{m}.lora_A.weight"
                assert st.get_slice(down).get_shape()[0] == rec["rank"]
                if rec["alpha_stored"]:
                    assert float(st.get_tensor(f"{m}.alpha")) == rec["alpha"]
                else:
                    assert f"{m}.alpha" not in keys


@pytest.mark.parity
def test_generated_shapes_are_the_real_architectures():
    """Every module of fixtures/generated has the weight shape of the real SD1.5 / SD2.1 / SDXL model."""
    _torch_modules()
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def unet(**kw):
        with torch.device("meta"):
            return UNet2DConditionModel(**kw)

    def clip(hidden, inter, layers, heads):
        cfg = CLIPTextConfig(
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            projection_dim=hidden,
        )
        with torch.device("meta"):
            return CLIPTextModelWithProjection(cfg)  # keeps the text_model. level of transformers 4 names

    sd_blocks = {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }
    models = {
        "sd1": {"unet": unet(cross_attention_dim=768, **sd_blocks), "text_encoder": clip(768, 3072, 12, 12)},
        "sd2": {
            "unet": unet(
                cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, **sd_blocks
            ),
            "text_encoder": clip(1024, 4096, 23, 16),
        },
        "sdxl": {
            "unet": unet(
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                block_out_channels=[320, 640, 1280],
                transformer_layers_per_block=[1, 2, 10],
                attention_head_dim=[5, 10, 20],
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            ),
            "text_encoder": clip(768, 3072, 12, 12),
            "text_encoder_2": clip(1280, 5120, 32, 20),
        },
    }
    for f in GEN_INDEX["files"]:
        comps = models[f["family"]]
        for rec in f["modules"]:
            comp, path = rec["canonical"].split(".", 1)
            layer = comps[comp].get_submodule(path)
            assert tuple(layer.weight.shape) == tuple(rec["weight_shape"]), (f["file"], rec["canonical"])


# ============================================================================================ manifests


def _corpus(name: str) -> Path:
    p = CORPUS_DIR / name
    if not p.is_file():
        pytest.skip(f"corpus not available: {p}")
    return p


def _decode(header: dict, start: int, path: Path, key: str) -> np.ndarray:
    info = header[key]
    b0, b1 = info["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(start + b0)
        raw = fh.read(b1 - b0)
    if info["dtype"] == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return np.frombuffer(raw, {"F16": "<f2", "F32": "<f4"}[info["dtype"]]).astype(np.float32).reshape(info["shape"])


def test_manifest_roundtrip_kohya_sdxl(tmp_path):
    m = load_manifest(_corpus("real/kohya_sdxl_anyaxl.json"))
    out = tmp_path / "anyaxl.safetensors"
    res = manifest_to_safetensors(m, out, seed=3)
    assert res.skipped == []
    header = check_safetensors(out)
    _, start = raw_header(out)
    meta = header.pop("__metadata__")
    assert meta == m["metadata"]
    assert list(header) == list(m["tensors"])  # manifest order kept
    for k, info in m["tensors"].items():
        assert header[k]["shape"] == info["shape"] and header[k]["dtype"] == info["dtype"]
    assert res.nbytes == out.stat().st_size == start + manifest_nbytes(m)
    alpha = float(m["metadata"]["ss_network_alpha"])
    for k in (k for k in header if k.endswith(".alpha")):
        assert _decode(header, start, out, k) == alpha
    up = next(k for k in header if k.endswith(".lora_up.weight"))
    v = _decode(header, start, out, up)
    assert 0 < np.abs(v).max() < 0.1 and np.isfinite(v).all()


def test_manifest_determinism_fill_and_subset(tmp_path):
    m = load_manifest(_corpus("real/kohya_sd15_add-detail.json"))
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    manifest_to_safetensors(m, a, seed=1)
    manifest_to_safetensors(m, b, seed=1)
    manifest_to_safetensors(m, c, seed=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    z = tmp_path / "z.safetensors"
    res = manifest_to_safetensors(m, z, fill="zeros")
    header, start = raw_header(z)
    for k in header:
        if k == "__metadata__":
            continue
        v = _decode(header, start, z, k)
        if k.endswith(".alpha"):  # no metadata: alpha = rank from lora_down
            rank = header[k.replace(".alpha", ".lora_down.weight")]["shape"][0]
            assert v == rank == res.alphas[k]
        else:
            assert not v.any()
    keys = list(m["tensors"])[:5]
    s = tmp_path / "s.safetensors"
    assert manifest_to_safetensors(m, s, keys=reversed(keys)).written == keys
    with pytest.raises(ValueError, match="max_bytes"):
        manifest_to_safetensors(m, tmp_path / "big.safetensors", max_bytes=1000)
    assert not (tmp_path / "big.safetensors").exists()


def test_manifest_null_dtype_shape_and_magnitudes(tmp_path):
    # null dtypes -> F16, DoRA magnitudes ~1
    m = load_manifest(_corpus("real/onetrainer_flux_envy-dreamtown-dora.json"))
    out = tmp_path / "dora.safetensors"
    manifest_to_safetensors(m, out)
    header, start = raw_header(out)
    header.pop("__metadata__", None)
    assert {v["dtype"] for v in header.values()} == {"F16"}
    mags = [k for k in header if k.endswith("dora_scale")]
    assert mags
    v = _decode(header, start, out, mags[0])
    assert np.abs(v - 1).max() < 0.1
    # keys-only manifest: everything but .alpha is skipped
    m = load_manifest(_corpus("real/kohya_sd1-or-sd2_keysjson-segment4-locon-unet-only.json"))
    res = manifest_to_safetensors(m, tmp_path / "keys.safetensors")
    assert res.skipped and all(m["tensors"][k]["shape"] is None for k in res.skipped)
    assert all(k.endswith(".alpha") for k in res.written)
    check_safetensors(tmp_path / "keys.safetensors")


def test_manifest_metadata_stringified_and_bf16(tmp_path):
    m = {
        "metadata": {"ss_network_alpha": 4, "software": {"name": "x"}, "plain": "s"},
        "tensors": {
            "lora_unet_a.lora_down.weight": {"shape": [8, 16, 3, 3], "dtype": "BF16"},
            "lora_unet_a.lora_up.weight": {"shape": [16, 8, 1, 1], "dtype": "BF16"},
            "lora_unet_a.alpha": {"shape": None, "dtype": "BF16"},
            "lora_unet_b.lora_down.weight": {"shape": [8, 16], "dtype": "F32"},
            "lora_unet_b.alpha": {"shape": [], "dtype": "F32"},
            "lora_unet_c.on_input": {"shape": [], "dtype": "I64"},
        },
    }
    out = tmp_path / "m.safetensors"
    res = manifest_to_safetensors(m, out, seed=5)
    header = check_safetensors(out)
    _, start = raw_header(out)
    assert header["__metadata__"] == {"ss_network_alpha": "4", "software": '{"name": "x"}', "plain": "s"}
    assert res.alphas == {"lora_unet_a.alpha": 4.0, "lora_unet_b.alpha": 4.0}
    assert _decode(header, start, out, "lora_unet_a.alpha") == 4.0
    assert header["lora_unet_c.on_input"]["dtype"] == "I64"
    from lorafmt.io.safetensors_io import read_header

    h = read_header(out)  # lorafmt's reader accepts the file and decodes bf16 the same way
    np.testing.assert_array_equal(
        h.read_float32("lora_unet_a.lora_down.weight"), _decode(header, start, out, "lora_unet_a.lora_down.weight")
    )
