"""Generators for the benchmark inputs: realistic kohya LoRA files and diffusers U-Net base files.

Module sets are the ones kohya sd-scripts trains by default (``networks/lora.py``: every Linear/1x1-Conv inside
``Transformer2DModel`` in the U-Net, ``CLIPAttention``/``CLIPMLP`` in the text encoders; ``networks/lora_flux.py``:
every Linear in the Flux double/single blocks). U-Net module names and shapes come from diffusers'
``UNet2DConditionModel`` built with the real SD1.5 / SDXL configs on the meta device (no weights, no network);
CLIP widths are the published CLIP-L / OpenCLIP-G ones; Flux names and shapes are those of sd-scripts
``lora_flux`` files (see ``fixtures/corpus/real/kohya_flux_*.json``). SDXL U-Net names are written in SGM
spelling (``input_blocks_4_1_…``) as sd-scripts does.

Values are random normals (finite, fp16/bf16), so ``--check-values`` and fuse have real numbers to look at.
"""

from __future__ import annotations

import json
import math
import os
import struct
from functools import lru_cache

import numpy as np

SD15_UNET_CONFIG = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (the diffusers defaults)
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_UNET_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
UNET_CONFIGS = {"sd1": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}

CLIP_L = (768, 3072, 12)  # hidden, intermediate, layers (SD1.x text encoder, SDXL text_encoder)
CLIP_G = (1280, 5120, 32)  # SDXL text_encoder_2

_POOL_ELEMS = 1 << 25  # 64 MiB of fp16 values, sliced for every tensor


@lru_cache(maxsize=None)
def _pool(dtype: str) -> bytes:
    rng = np.random.default_rng(0)
    vals = rng.standard_normal(_POOL_ELEMS, dtype=np.float32) * 0.02
    if dtype == "F16":
        return vals.astype("<f2").tobytes()
    if dtype == "BF16":
        return (vals.view(np.uint32) >> 16).astype("<u2").tobytes()
    return vals.astype("<f4").tobytes()


@lru_cache(maxsize=None)
def _meta_unet(family: str):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**UNET_CONFIGS[family])


def unet_lora_modules(family: str) -> list[tuple[str, tuple[int, ...]]]:
    """(diffusers module path, weight shape) of every module sd-scripts adapts in the U-Net."""
    import torch

    unet = _meta_unet(family)
    out = []
    for name, mod in unet.named_modules():
        inside = ".attentions." in name and (".transformer_blocks." in name or name.endswith(("proj_in", "proj_out")))
        if inside and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            out.append((name, tuple(mod.weight.shape)))
    return out


def unet_base_tensors(family: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of the diffusers U-Net state dict."""
    return [(k, tuple(v.shape)) for k, v in _meta_unet(family).state_dict().items()]


def clip_modules(width: int, inter: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.append((f"{p}.self_attn.{proj}", (width, width)))
        out.append((f"{p}.mlp.fc1", (inter, width)))
        out.append((f"{p}.mlp.fc2", (width, inter)))
    return out


def flux_modules() -> list[tuple[str, tuple[int, ...]]]:
    """BFL module names and (out, in) shapes of the Flux.1 transformer blocks sd-scripts' lora_flux adapts."""
    h, mlp = 3072, 12288
    out = []
    for i in range(19):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            out += [
                (f"{p}_attn.proj", (h, h)),
                (f"{p}_attn.qkv", (3 * h, h)),
                (f"{p}_mlp.0", (mlp, h)),
                (f"{p}_mlp.2", (h, mlp)),
                (f"{p}_mod.lin", (6 * h, h)),
            ]
    for i in range(38):
        p = f"single_blocks.{i}"
        out += [(f"{p}.linear1", (3 * h + mlp, h)), (f"{p}.linear2", (h, h + mlp)), (f"{p}.modulation.lin", (3 * h, h))]
    return out


def _lora_tensors(name: str, shape: tuple[int, ...], rank: int, dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    out_f, in_f = shape[0], shape[1]
    tail = tuple(shape[2:])
    if tail and tail != (1, 1):  # conv 3x3 (LoCon): down carries the kernel, up is 1x1
        down, up = (rank, in_f, *tail), (out_f, rank, 1, 1)
    elif tail:
        down, up = (rank, in_f, 1, 1), (out_f, rank, 1, 1)
    else:
        down, up = (rank, in_f), (out_f, rank)
    return [
        (f"{name}.alpha", dtype, ()),
        (f"{name}.lora_down.weight", dtype, down),
        (f"{name}.lora_up.weight", dtype, up),
    ]


def kohya_keys(family: str, rank: int, *, text_encoders: bool = True, dtype: str | None = None) -> tuple[list, dict[str, str]]:
    """Key list [(key, dtype, shape)] and metadata of a kohya sd-scripts LoRA for `family`.

    dtype defaults to BF16 for Flux and F16 otherwise (``--save_precision``); F32 is what older SD1.5 files hold.
    """
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    if family == "flux1":
        dtype = dtype or "BF16"
        for path, shape in flux_modules():
            entries += _lora_tensors("lora_unet_" + path.replace(".", "_"), shape, rank, dtype)
        meta = {
            "ss_network_module": "networks.lora_flux",
            "ss_base_model_version": "flux1",
            "modelspec.architecture": "flux-1-dev/lora",
        }
    else:
        dtype = dtype or "F16"
        if family == "sdxl":
            from lorafmt.naming.sd_unet import UNET_LAYOUTS, diffusers_to_sgm

            def unet_name(p: str) -> str:
                return diffusers_to_sgm(p, UNET_LAYOUTS["sdxl"]) or p
        else:

            def unet_name(p: str) -> str:
                return p

        for path, shape in unet_lora_modules(family):
            entries += _lora_tensors("lora_unet_" + unet_name(path).replace(".", "_"), shape, rank, dtype)
        if text_encoders:
            if family == "sdxl":
                for path, shape in clip_modules(*CLIP_L):
                    entries += _lora_tensors("lora_te1_" + path.replace(".", "_"), shape, rank, dtype)
                for path, shape in clip_modules(*CLIP_G):
                    entries += _lora_tensors("lora_te2_" + path.replace(".", "_"), shape, rank, dtype)
            else:
                for path, shape in clip_modules(*CLIP_L):
                    entries += _lora_tensors("lora_te_" + path.replace(".", "_"), shape, rank, dtype)
        meta = {
            "ss_network_module": "networks.lora",
            "ss_base_model_version": "sdxl_base_v1-0" if family == "sdxl" else "sd_v1",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if family == "sdxl" else "stable-diffusion-v1/lora",
        }
    meta.update({"ss_network_dim": str(rank), "ss_network_alpha": str(rank // 2 or 1), "ss_output_name": f"bench_{family}_r{rank}"})
    return entries, meta


def _write(path: str, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str], alpha: float | None = None) -> int:
    """Write a safetensors file, streaming values from the random pool; returns its size."""
    entries = sorted(entries)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    sizes = []
    for key, dtype, shape in entries:
        n = math.prod(shape) * (4 if dtype == "F32" else 2)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
        sizes.append(n)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    pos = 0
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for (key, dtype, shape), n in zip(entries, sizes):
            if key.endswith(".alpha"):
                value = np.asarray(alpha if alpha is not None else 1.0, dtype=np.float32)
                if dtype == "F16":
                    fh.write(value.astype("<f2").tobytes())
                elif dtype == "BF16":
                    fh.write((value.view(np.uint32) >> 16).astype("<u2").tobytes())
                else:
                    fh.write(value.astype("<f4").tobytes())
                continue
            pool = _pool(dtype)
            while n > 0:
                if pos >= len(pool):
                    pos = 0
                take = min(n, len(pool) - pos)
                fh.write(memoryview(pool)[pos : pos + take])
                pos += take + 2 * 4099  # odd stride: neighbouring tensors do not share values
                n -= take
    os.replace(tmp, path)
    return os.path.getsize(path)


# Bumped whenever generated files change, so `run.py` regenerates cached inputs.
GEN_VERSION = "2"  # 2: kohya files carry sd-scripts' sshs_model_hash / sshs_legacy_hash


def make_kohya(path: str, family: str, rank: int, *, text_encoders: bool = True, dtype: str | None = None) -> int:
    """A kohya LoRA as sd-scripts saves it, including the weights-only hashes it stores in the metadata."""
    from lorafmt.metadata import update_file_hashes

    entries, meta = kohya_keys(family, rank, text_encoders=text_encoders, dtype=dtype)
    _write(path, entries, meta, alpha=float(rank // 2 or 1))
    update_file_hashes(path, ["sshs_model_hash", "sshs_legacy_hash"])
    return os.path.getsize(path)


def make_unet_base(path: str, family: str) -> int:
    """A diffusers-layout fp16 U-Net file (``diffusion_pytorch_model.safetensors`` keys) with random weights."""
    entries = [(k, "F16", shape) for k, shape in unet_base_tensors(family)]
    return _write(path, entries, {"format": "pt"})


def kohya_size(family: str, rank: int, *, text_encoders: bool = True, dtype: str | None = None) -> int:
    entries, _ = kohya_keys(family, rank, text_encoders=text_encoders, dtype=dtype)
    return sum(math.prod(s) * (4 if d == "F32" else 2) for _, d, s in entries)
