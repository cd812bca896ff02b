"""Metadata: typed kohya/ModelSpec keys, refresh on conversion, and kohya's weights-only hashes."""

from __future__ import annotations

import hashlib
import json
from io import BytesIO

import numpy as np
import pytest

import lorafmt
from lorafmt.metadata import (
    HASH_KEYS,
    KnownMetadata,
    architecture_id,
    kohya_hashes,
    recompute_hashes,
    refresh_metadata,
    update_file_hashes,
)
from lorafmt.testing import make_lora

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


# The reference: sd-scripts' library/train_util.py (precalculate_safetensors_hashes, addnet_hash_safetensors,
# addnet_hash_legacy), as formats.md §3.1 describes them, run on the real safetensors serialiser.
def reference_kohya_hashes(tensors: dict, metadata: dict) -> tuple[str, str]:
    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors_torch.save(tensors, metadata))
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model = hashlib.sha256()
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        model.update(chunk)
    legacy = hashlib.sha256()
    b.seek(0x100000)
    legacy.update(b.read(0x10000))
    return model.hexdigest(), legacy.hexdigest()[0:8]


KOHYA_META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1"}),
    "ss_base_model_version": "sd_v1",
    "ss_v2": "False",
    "ss_output_name": "pixel_style",
    "ss_resolution": "(512, 512)",
    "ss_clip_skip": "2",
    "ss_steps": "1200",
    "ss_learning_rate": "0.0001",
    "ss_tag_frequency": json.dumps({"10_px": {"pixel art": 40, "1girl": 12}}),
    "ss_training_started_at": "1700000000.5",
    "modelspec.sai_model_spec": "1.0.1",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.implementation": "diffusers",
    "modelspec.title": "Pixel Style",
    "modelspec.trigger_phrase": "pxl, pixel art",
    "modelspec.resolution": "512x512",
    "modelspec.tags": "style, pixel",
    "modelspec.hash_sha256": "0xdeadbeef",
    "sshs_model_hash": "0" * 64,
    "sshs_legacy_hash": "00000000",
    "ü-non-ascii": "värde",
}


def test_known_metadata_is_typed():
    km = KnownMetadata.from_metadata(KOHYA_META)
    assert km.family == "sd1" and km.architecture == "stable-diffusion-v1/lora"
    assert km.title == "Pixel Style" and km.output_name == "pixel_style"
    assert km.trigger_words == ["pxl", "pixel art"] and km.tags == ["style", "pixel"]
    assert km.resolution == (512, 512) and km.network_dim == 4 and km.network_alpha == 2.0
    assert km.network_module == "networks.lora" and km.network_args == {"conv_dim": "4", "conv_alpha": "1"}
    assert km.clip_skip == 2 and km.steps == 1200 and km.learning_rate == 1e-4 and km.v2 is False
    assert km.tag_frequency["10_px"]["pixel art"] == 40 and km.problems == []
    bad = KnownMetadata.from_metadata({"ss_network_dim": "four", "modelspec.resolution": "big", "ss_network_alpha": "Dynamic",
                                       "ss_output_name": "fallback title", "ss_tag_frequency": "{oops"})
    assert bad.network_dim is None and bad.resolution is None and bad.network_alpha is None
    assert bad.title == "fallback title" and len(bad.problems) == 3
    assert KnownMetadata.from_metadata({"ss_resolution": "[1024, 768]"}).resolution == (1024, 768)
    assert KnownMetadata.model_json_schema()["properties"]["trigger_words"]["type"] == "array"


@pytest.mark.parametrize("big", [False, True], ids=["under-1MiB", "over-1MiB"])
def test_kohya_hashes_match_sd_scripts_on_the_real_serialiser(tmp_path, big):
    g = torch.Generator().manual_seed(0)
    width = 16384 if big else 64
    tensors = {
        "lora_unet_a.lora_down.weight": torch.randn(16, width, generator=g).to(torch.bfloat16),
        "lora_unet_a.lora_up.weight": torch.randn(width, 16, generator=g).to(torch.bfloat16),
        "lora_unet_a.alpha": torch.tensor(4.0),
        "lora_te_b.lora_down.weight": torch.randn(4, width, generator=g).to(torch.float16),
        "lora_te_b.lora_up.weight": torch.randn(width, 4, generator=g).to(torch.float16),
        "lora_te_b.alpha": torch.tensor(2.0, dtype=torch.float16),
    }
    path = tmp_path / "k.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata=KOHYA_META)
    expected = reference_kohya_hashes(tensors, KOHYA_META)
    assert kohya_hashes(path) == expected
    assert (expected[1] == "e3b0c442") is (not big)  # an empty legacy window below 1 MiB
    # lorafmt writes keys in sorted order, not safetensors' dtype order: the hashes are the same anyway
    lora = lorafmt.read(path)
    out = tmp_path / "copy.safetensors"
    lorafmt.write(lora, out, layout="kohya")
    assert kohya_hashes(out) == expected
    assert recompute_hashes(out)["modelspec.hash_sha256"] == "0x" + expected[0]
    # the values stored by the write (computed from the planned bytes before writing) are those hashes too
    stored = lorafmt.read(out).metadata
    assert stored["sshs_model_hash"] == expected[0] and stored["modelspec.hash_sha256"] == "0x" + expected[0]


def test_refresh_metadata_rewrites_only_stale_keys():
    lora = make_lora("sdxl", modules=4, rank=8, alpha=4.0)
    fresh = refresh_metadata(KOHYA_META, target_layout="kohya", family="sdxl", modules=lora.modules)
    assert not set(HASH_KEYS) & set(fresh)
    assert fresh["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert fresh["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert fresh["ss_base_model_version"] == "sdxl_base_v1-0" and fresh["ss_v2"] == "False"
    assert fresh["ss_network_dim"] == "8" and fresh["ss_network_alpha"] == "4.0"
    assert fresh["modelspec.title"] == "Pixel Style" and fresh["ü-non-ascii"] == "värde"
    # still right: spelling kept; absent keys are not invented
    same = refresh_metadata({"ss_network_dim": "8", "ss_network_alpha": "4", "ss_v2": "false"}, family="sdxl", modules=lora.modules)
    assert same == {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_v2": "false"}
    assert refresh_metadata({}, family="sd1", modules=lora.modules) == {}
    # the variant of a family is kept; another family replaces it
    assert architecture_id("sd2", current="stable-diffusion-v2-768-v/lora") == "stable-diffusion-v2-768-v/lora"
    assert architecture_id("flux1", "lora", current="stable-diffusion-v1/lora") == "flux-1-dev/lora"
    loha = make_lora("sd1", modules=2, algorithm="loha")
    assert refresh_metadata({"ss_network_module": "networks.lora"}, target_layout="kohya", family="sd1", modules=loha.modules) == {
        "ss_network_module": "lycoris.kohya"
    }


def test_conversion_carries_metadata_and_recomputes_hashes(tmp_path):
    lora = make_lora("sd1", modules=6, rank=4, alpha=2.0, dtype="F16", metadata=KOHYA_META)
    src = tmp_path / "src.safetensors"
    lorafmt.write(lora, src, layout="kohya")
    src_meta = lorafmt.read(src).metadata
    assert src_meta["sshs_model_hash"] == kohya_hashes(src)[0] != "0" * 64
    assert src_meta["modelspec.hash_sha256"] == "0x" + src_meta["sshs_model_hash"]
    for to in ("diffusers", "kohya"):
        dst = tmp_path / f"{to}.safetensors"
        lorafmt.convert(src, dst, to=to, dtype="fp32")
        meta = lorafmt.read(dst).metadata
        assert meta["modelspec.title"] == "Pixel Style" and meta["ss_tag_frequency"] == KOHYA_META["ss_tag_frequency"]
        assert lorafmt.diff(src, dst).same
        if to != "kohya":  # only kohya files carry the hashes (sd-scripts and A1111 use them); stale ones are dropped
            assert not set(HASH_KEYS) & set(meta)
            continue
        model, legacy = kohya_hashes(dst)
        assert meta["sshs_model_hash"] == model != src_meta["sshs_model_hash"]  # fp32 bytes: a new hash
        assert meta["sshs_legacy_hash"] == legacy and meta["modelspec.hash_sha256"] == "0x" + model


def test_fresh_hashes_cost_no_second_write(tmp_path, monkeypatch):
    """The hashes are computed from the planned bytes: the output is renamed into place once, never rewritten."""
    import os

    lora = make_lora("sd1", modules=3, rank=4, alpha=2.0, dtype="F16", metadata=KOHYA_META)
    src = tmp_path / "src.safetensors"
    lorafmt.write(lora, src, layout="kohya")
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append(str(b)), real(a, b))[1])
    lorafmt.convert(src, tmp_path / "out.safetensors", to="kohya")
    assert renames == [str(tmp_path / "out.safetensors")]
    meta = lorafmt.read(tmp_path / "out.safetensors").metadata
    assert meta["sshs_model_hash"] == kohya_hashes(tmp_path / "out.safetensors")[0]


def test_update_file_hashes_is_idempotent_and_keeps_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors_torch.save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(path),
                                metadata={"ss_output_name": "x", "modelspec.hash_sha256": "abc"})
    values = update_file_hashes(path, ["modelspec.hash_sha256", "sshs_model_hash"])
    assert not values["modelspec.hash_sha256"].startswith("0x")  # the file's spelling is kept
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        assert f.metadata()["sshs_model_hash"] == values["sshs_model_hash"]
        np.testing.assert_array_equal(f.get_tensor("w"), np.arange(6, dtype=np.float32).reshape(2, 3))
    before = path.read_bytes()
    assert update_file_hashes(path, ["sshs_model_hash"]) == {"sshs_model_hash": values["sshs_model_hash"]}
    assert path.read_bytes() == before
