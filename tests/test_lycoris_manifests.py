"""Real-world LyCORIS / DoRA key-and-shape manifests (``fixtures/corpus/real``) are detected with the right
algorithm. Manifests become real (sparse) .safetensors files: the header as recorded, zero data, real alphas."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import lorafmt
from lorafmt.layouts._common import KNOWN_PARAMS, module_params

CORPUS = Path(os.environ.get("LORAFMT_CORPUS", Path(__file__).resolve().parents[1] / "fixtures" / "corpus")) / "real"
SIZES = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8}

# manifest -> (algorithm of every module, DoRA axis or None, readable by the kohya layout)
EXPECTED = {
    "lycoris_loha_sdxl_gwei.json": ("loha", None, True),
    "lycoris_lokr_sdxl_keysjson-segment1.json": ("lokr", None, True),
    "lycoris_diag_oft_sd1_keysjson-segment3.json": ("oft", None, True),
    "lycoris_lokr_krea2_realism-engine-v2.json": ("lokr", None, False),
    "onetrainer_flux_ball-flux-dora-te.json": ("lora", "in", False),
    "onetrainer_flux_envy-dreamtown-dora.json": ("lora", "in", False),
}


def _default_shape(key: str) -> list[int]:
    if key.endswith(".alpha"):
        return []
    if key.endswith((".oft_diag", ".oft_blocks")):
        return [1, 2, 2]
    return [1, 1]


def manifest_file(manifest: Path, out: Path) -> Path:
    """Write `manifest` as a sparse safetensors file (unknown shapes get the smallest valid ones)."""
    data = json.loads(manifest.read_text())
    header: dict = {}
    offset = 0
    alphas = []
    for key, info in data["tensors"].items():
        shape = info.get("shape")
        shape = _default_shape(key) if shape is None else list(shape)
        dtype = info.get("dtype") or "F16"
        n = int(np.prod(shape, dtype=np.int64)) * SIZES[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        if key.endswith(".alpha"):
            alphas.append((offset, dtype))
        offset += n
    if data.get("metadata"):
        header["__metadata__"] = {k: str(v) for k, v in data["metadata"].items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        start = fh.tell()
        fh.truncate(start + offset)
        for off, dtype in alphas:  # alpha 4 (zeros would be refused as invalid alphas)
            fh.seek(start + off)
            value = np.asarray(4.0, dtype={"F16": np.float16, "F32": np.float32}.get(dtype, np.float32))
            fh.write(value.tobytes() if dtype != "BF16" else b"\x80\x40")
    return out


def _param_groups(keys) -> dict[str, set[str]]:
    """module name -> parameter names, splitting each key at the longest known parameter suffix."""
    known = sorted(KNOWN_PARAMS(), key=len, reverse=True)
    groups: dict[str, set[str]] = {}
    for key in keys:
        for p in known:
            if key.endswith("." + p):
                groups.setdefault(key[: -len(p) - 1], set()).add(p)
                break
        else:
            raise AssertionError(f"no known parameter explains {key}")
    return groups


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_manifest_algorithm_detected(name, tmp_path):
    path = CORPUS / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    algo, dora_axis, kohya = EXPECTED[name]
    data = json.loads(path.read_text())
    # the algorithm axis alone: every module's parameter set names one algorithm
    for module, params in _param_groups(data["tensors"]).items():
        assert module_params(params)[0] == algo, module
    if not kohya:
        if dora_axis:
            shapes = [v["shape"] for k, v in data["tensors"].items() if k.endswith(".dora_scale")]
            assert shapes and all(s[0] == 1 for s in shapes)  # (1, in): OneTrainer's input-axis default
        return
    lora = lorafmt.read(manifest_file(path, tmp_path / "m.safetensors"))
    assert lora.provenance.layout == "kohya"
    assert lora.algorithms == [algo]
    assert not lora.unplaced, sorted(lora.unplaced)[:3]
    assert not [d for d in lora.issues if d.severity == "error"]
    assert len(lora.modules) == len(_param_groups(data["tensors"]))
    if name.startswith("lycoris_loha_sdxl"):
        assert lora.family == "sdxl"
        ranks = {m.rank for m in lora.modules.values()}
        assert ranks <= {32, 8}  # conv_dim 8, network_dim 32 (hada_w1_b.shape[0])


def test_onetrainer_dora_axis_kept_and_refused_for_peft(tmp_path):
    """OneTrainer's (1, in) dora_scale is an input-axis magnitude: kohya keeps it, PEFT/diffusers cannot."""
    path = CORPUS / "onetrainer_flux_envy-dreamtown-dora.json"
    if not path.exists():
        pytest.skip("corpus not available")
    data = json.loads(path.read_text())
    keys = [k for k in data["tensors"] if k.startswith("lora_transformer_single_transformer_blocks_0_attn_to_q.")]
    # the same module under an SD1 kohya name, same shapes
    renamed = {k.replace("lora_transformer_single_transformer_blocks_0_attn_to_q", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"): data["tensors"][k] for k in keys}
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"tensors": renamed}))
    lora = lorafmt.read(manifest_file(m, tmp_path / "m.safetensors"), family="sd1")
    (mod,) = lora.modules.values()
    assert mod.dora_axis == "in" and mod.dora_scale.shape == (1, 3072)
    with pytest.raises(lorafmt.LorafmtError, match="per input column"):
        lorafmt.write(lora, tmp_path / "p", layout="peft")
