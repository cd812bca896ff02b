"""Fusing into original single-file SD1.x / SD2.x / SDXL checkpoints hits the right original-layout tensors.

Each test builds a small original-layout checkpoint (U-Net with the real block structure at toy width, HF CLIP
and/or OpenCLIP text towers with fused ``in_proj_weight``), converts it with diffusers' own single-file
converters into a diffusers pipeline folder, fuses the same LoRA into both, converts the fused checkpoint with
diffusers again, and requires the result to equal the fused pipeline tensor for tensor.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from _fuse_support import (
    CLIP_TINY,
    SD15_TINY,
    SDXL_TINY,
    clip_hf_shapes,
    clip_lora_targets,
    lora_targets,
    make_kohya_lora,
    meta_shapes,
    openclip_shapes,
    save_tensors,
)
from lorafmt.fuse import fuse
from lorafmt.naming.checkpoint import checkpoint_family, checkpoint_target
from lorafmt.naming.sd_unet import UNET_LAYOUTS, diffusers_to_sgm

torch = pytest.importorskip("torch")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

FAMILIES = {
    "sd1": {"unet": SD15_TINY, "te": ("cond_stage_model.transformer.", "hf"), "te2": None},
    "sd2": {"unet": {**SD15_TINY, "use_linear_projection": True}, "te": ("cond_stage_model.model.", "openclip"),
            "te2": None},
    "sdxl": {"unet": SDXL_TINY, "te": ("conditioner.embedders.0.transformer.", "hf"),
             "te2": ("conditioner.embedders.1.model.", "openclip")},
}


def _checkpoint(family: str, rng) -> dict[str, np.ndarray]:
    spec = FAMILIES[family]
    ck = {}
    for key, shape in meta_shapes(spec["unet"]).items():
        mod, _, param = key.rpartition(".")
        t = checkpoint_target("unet." + mod, family)
        ck[t.key if param == "weight" else t.bias_key] = rng.standard_normal(shape).astype(np.float32) * 0.1
    for slot in ("te", "te2"):
        if spec[slot] is None:
            continue
        prefix, kind = spec[slot]
        shapes = clip_hf_shapes() if kind == "hf" else openclip_shapes(prefix)
        for key, shape in shapes.items():
            name = prefix + key if kind == "hf" else key
            ck[name] = rng.standard_normal(shape).astype(np.float32) * 0.1
    ck["first_stage_model.decoder.conv_in.weight"] = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    return {k: np.asarray(v, np.float16).astype(np.float32) for k, v in ck.items()}


def _diffusers_components(family: str, ck: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """diffusers' own single-file conversion of the checkpoint, per component."""
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = FAMILIES[family]
    tck = {k: torch.from_numpy(v) for k, v in ck.items()}
    out = {"unet": single_file.convert_ldm_unet_checkpoint(tck, spec["unet"])}
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_TINY))
    for slot, comp in (("te", "text_encoder"), ("te2", "text_encoder_2")):
        if spec[slot] is None:
            continue
        prefix, kind = spec[slot]
        if kind == "hf":
            out[comp] = single_file.convert_ldm_clip_checkpoint(tck)
        else:
            out[comp] = single_file.convert_open_clip_checkpoint(clip, tck, prefix=prefix)
    return {c: {k: v.numpy() for k, v in sd.items()} for c, sd in out.items()}


def _lora(family: str, path, seed: int) -> None:
    """One kohya file covering U-Net attention + LoCon convs and every text encoder's q/k/v/out/fc1/fc2."""
    from lorafmt.io.safetensors_io import WriteEntry, build_header, read_header, write_entries

    spec = FAMILIES[family]
    parts = []
    unet = lora_targets(meta_shapes(spec["unet"]), conv3x3=True)
    name_of = (lambda m: diffusers_to_sgm(m, UNET_LAYOUTS["sdxl"])) if family == "sdxl" else None
    make_kohya_lora(path.with_suffix(".u.safetensors"), unet, seed=seed, name_of=name_of)
    parts.append(path.with_suffix(".u.safetensors"))
    te_prefixes = ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]
    for i, prefix in enumerate(te_prefixes):
        p = path.with_suffix(f".t{i}.safetensors")
        make_kohya_lora(p, clip_lora_targets(), prefix=prefix, seed=seed + 10 + i, rank=4, alpha=4.0)
        parts.append(p)
    headers = [read_header(p) for p in parts]
    entries = [WriteEntry(k, i.dtype, i.shape, src_path=h.path, src_offset=i.start, nbytes=i.nbytes)
               for h in headers for k, i in h.tensors.items()]
    meta = {"ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]}
    with open(path, "wb") as fh:
        fh.write(build_header(entries, meta))
        write_entries(fh, entries)


def _load(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.parity
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_checkpoint_fuse_equals_pipeline_fuse_through_diffusers_conversion(family, tmp_path):
    rng = np.random.default_rng(7)
    ck = _checkpoint(family, rng)
    assert checkpoint_family(ck) == family
    ck_path = tmp_path / "model.safetensors"
    save_tensors(ck_path, ck, dtype="F16", metadata={})
    comps = _diffusers_components(family, ck)
    pipe = tmp_path / "pipe"
    for comp, sd in comps.items():
        (pipe / comp).mkdir(parents=True)
        name = "diffusion_pytorch_model.safetensors" if comp == "unet" else "model.safetensors"
        save_tensors(pipe / comp / name, sd, dtype="F16")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    lora = tmp_path / "lora.safetensors"
    _lora(family, lora, seed=11)

    r_ck = fuse(ck_path, [(lora, 0.7)], tmp_path / "fused.safetensors", device="cpu")
    r_pipe = fuse(pipe, [(lora, 0.7)], tmp_path / "fused_pipe", device="cpu", family=family)
    assert r_ck.kind == "checkpoint" and r_ck.family == family
    assert r_ck.unmatched == [] and r_pipe.unmatched == []
    assert r_ck.modules_fused == r_pipe.modules_fused
    expected_components = ["text_encoder", "text_encoder_2", "unet"] if family == "sdxl" else ["text_encoder", "unet"]
    assert r_ck.components == expected_components

    fused_ck = _load(tmp_path / "fused.safetensors")
    base_ck = _load(ck_path)
    # Converted with diffusers' own code, the fused checkpoint equals the fused pipeline tensor for tensor.
    reconverted = _diffusers_components(family, {k: v.astype(np.float32) for k, v in fused_ck.items()})
    changed = 0
    for comp in comps:
        name = "diffusion_pytorch_model.safetensors" if comp == "unet" else "model.safetensors"
        fused_pipe = _load(tmp_path / "fused_pipe" / comp / name)
        for key, value in fused_pipe.items():
            np.testing.assert_array_equal(reconverted[comp][key].astype(np.float16), value, err_msg=f"{comp} {key}")
            changed += not np.array_equal(value, comps[comp][key].astype(np.float16))
    assert changed >= len(r_pipe.modules_fused)  # q/k/v of OpenCLIP count once per slice in the pipeline
    # Exactly the targeted original-layout tensors changed; everything else (VAE included) is byte-identical.
    targets = set()
    for path in r_ck.modules_fused:
        targets.add(checkpoint_target(path, family).key)
    for key in base_ck:
        same = fused_ck[key].tobytes() == base_ck[key].tobytes()
        assert same == (key not in targets), key
    if FAMILIES[family]["te2"] or FAMILIES[family]["te"][1] == "openclip":
        assert any(k.endswith("attn.in_proj_weight") for k in targets)


def test_checkpoint_target_table():
    t = checkpoint_target("text_encoder.text_model.encoder.layers.0.self_attn.v_proj", "sd2")
    assert t.key == "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    assert t.row_slice(3 * 1024) == slice(2048, 3072)
    assert checkpoint_target("text_encoder.encoder.layers.0.mlp.fc1", "sd1").key == (
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight")  # transformers 5 spelling
    assert checkpoint_target("text_encoder_2.text_model.encoder.layers.31.mlp.fc2", "sdxl").key == (
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.weight")
    assert checkpoint_target("unet.up_blocks.0.upsamplers.0.conv", "sd1").key == (
        "model.diffusion_model.output_blocks.2.1.conv.weight")
    assert checkpoint_target("unet.up_blocks.0.upsamplers.0.conv", "sdxl").key == (
        "model.diffusion_model.output_blocks.2.2.conv.weight")
    assert checkpoint_target("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "sd1") is None
