"""Builders shared by the fuse/apply/verify tests: base models generated from diffusers configs (never
downloaded), streamed to safetensors without materialising them, and kohya LoRA files with chosen targets.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lorafmt.dtypes import DTYPE_SIZES, from_float32
from lorafmt.io.safetensors_io import WriteEntry, build_header, write_entries
from lorafmt.naming.kohya_names import flatten

# Stable Diffusion 1.5 U-Net (runwayml/stable-diffusion-v1-5 unet/config.json, the fields that shape weights).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# The same block structure at toy width: every SD1.5 module name exists, weights are tiny.
SD15_TINY = {**SD15_UNET, "block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 48, "attention_head_dim": 4,
             "norm_num_groups": 8, "sample_size": 8}

# SDXL base U-Net (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_TINY = {**SDXL_UNET, "block_out_channels": [32, 64, 64], "cross_attention_dim": 48, "attention_head_dim": [2, 4, 4],
             "transformer_layers_per_block": [1, 2, 2], "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 8 + 6 * 8, "norm_num_groups": 8, "sample_size": 8}


def meta_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a diffusers UNet2DConditionModel built on the meta device (no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def stream_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16", seed: int = 0,
                              std: float = 0.02, metadata: dict | None = None) -> None:
    """Write random tensors of `shapes` to a safetensors file one tensor at a time (memory ≈ one tensor).

    Values are windows into one random pool at per-tensor offsets, so generating gigabytes stays fast.
    """
    rng = np.random.default_rng(seed)
    pool = from_float32((rng.standard_normal(1 << 22) * std).astype(np.float32), dtype)
    keys = sorted(shapes)
    sizes = {k: math.prod(shapes[k]) for k in keys}
    sizing = [WriteEntry(k, dtype, shapes[k], src_path=str(path), nbytes=sizes[k] * DTYPE_SIZES[dtype]) for k in keys]
    offsets = rng.integers(0, 1 << 20, size=len(keys))

    def entries():
        for k, off in zip(keys, offsets):
            n = sizes[k]
            reps = -(-(n + int(off)) // pool.size)
            data = np.tile(pool, reps)[int(off) : int(off) + n] if reps > 1 else pool[int(off) : int(off) + n]
            yield WriteEntry(k, dtype, shapes[k], data=np.ascontiguousarray(data).tobytes())

    with open(path, "wb") as fh:
        fh.write(build_header(sizing, metadata or {"format": "pt"}))
        write_entries(fh, entries())


def save_tensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F16", metadata: dict | None = None) -> None:
    """Write float arrays as `dtype` safetensors (small files)."""
    items = sorted(tensors.items())
    entries = [WriteEntry(k, dtype, tuple(v.shape), data=from_float32(np.asarray(v, np.float32), dtype).tobytes()) for k, v in items]
    with open(path, "wb") as fh:
        fh.write(build_header(entries, metadata or {"format": "pt"}))
        write_entries(fh, entries)


def lora_targets(shapes: dict[str, tuple[int, ...]], *, conv3x3: bool, limit: int | None = None) -> dict[str, tuple[int, ...]]:
    """Module path -> weight shape for what kohya LoRA/LoCon trains in a U-Net state dict.

    Attention projections, feed-forward, proj_in/out (1x1 conv or Linear) always; resnet/sampler 3x3 convs,
    time_emb_proj and conv_shortcut only when `conv3x3` (LoCon).
    """
    out = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        mod = key[: -len(".weight")]
        attn = ".attentions." in mod and mod.endswith(
            (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out"))
        conv = conv3x3 and mod.endswith((".conv1", ".conv2", ".conv_shortcut", ".time_emb_proj", "samplers.0.conv"))
        if attn or conv:
            out[mod] = shape
    if limit is not None:
        keep = sorted(out)[:: max(1, len(out) // limit)]
        out = {k: out[k] for k in keep}
    return out


def make_kohya_lora(path: Path, targets: dict[str, tuple[int, ...]], *, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                    prefix: str = "lora_unet", dtype: str = "F16", std: float = 0.05, nan_in: str | None = None,
                    name_of=None) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Write a kohya LoRA (LoCon for k×k convs) for `targets`; returns module -> (down, up, alpha) as decoded."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    alphas: dict[str, np.ndarray] = {}
    factors = {}
    for mod, shape in sorted(targets.items()):
        name = f"{prefix}_{flatten(name_of(mod) if name_of else mod)}"
        out_f, in_f = shape[0], shape[1]
        kernel = tuple(shape[2:])
        r = min(rank, out_f, in_f)
        down = (rng.standard_normal((r, in_f, *kernel)) * std).astype(np.float32)
        up = (rng.standard_normal((out_f, r, *((1,) * len(kernel)))) * std).astype(np.float32)
        if nan_in is not None and mod == nan_in:
            up[0, 0] = np.nan
        down = from_float32(down, dtype).astype(np.float32) if dtype == "F16" else down
        up = from_float32(up, dtype).astype(np.float32) if dtype == "F16" else up
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        alphas[f"{name}.alpha"] = np.asarray(alpha, np.float32)
        factors[mod] = (down, up, alpha)
    items = [WriteEntry(k, dtype, tuple(v.shape), data=from_float32(v, dtype).tobytes()) for k, v in tensors.items()]
    items += [WriteEntry(k, "F32", (), data=from_float32(v, "F32").tobytes()) for k, v in alphas.items()]
    items.sort(key=lambda e: e.key)
    with open(path, "wb") as fh:
        fh.write(build_header(items, {"ss_network_module": "networks.lora"}))
        write_entries(fh, items)
    return factors


def numpy_delta(down: np.ndarray, up: np.ndarray, alpha: float, shape: tuple[int, ...]) -> np.ndarray:
    """Independent reference ΔW (float64): kohya's merge arithmetic, alpha/rank included."""
    r = down.shape[0]
    dw = up.reshape(up.shape[0], -1).astype(np.float64) @ down.reshape(r, -1).astype(np.float64)
    return (dw * (alpha / r)).reshape(shape)


def fp16_ulp(x: np.ndarray) -> np.ndarray:
    """One fp16 rounding step at the magnitude of `x`."""
    x16 = np.abs(np.asarray(x, np.float32)).astype(np.float16)
    return (np.nextafter(x16, np.float16(np.inf)) - x16).astype(np.float32)


# Tiny CLIP text encoders (same module names as CLIP-L / OpenCLIP-H / bigG, toy widths).
CLIP_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 100, "max_position_embeddings": 16, "projection_dim": 32}


def clip_hf_shapes(prefix: str = "text_model.") -> dict[str, tuple[int, ...]]:
    """transformers CLIP text-model parameter shapes, spelled with `prefix` (original checkpoints keep text_model.)."""
    d, f, n = CLIP_TINY["hidden_size"], CLIP_TINY["intermediate_size"], CLIP_TINY["num_hidden_layers"]
    out = {
        f"{prefix}embeddings.token_embedding.weight": (CLIP_TINY["vocab_size"], d),
        f"{prefix}embeddings.position_embedding.weight": (CLIP_TINY["max_position_embeddings"], d),
        f"{prefix}final_layer_norm.weight": (d,),
        f"{prefix}final_layer_norm.bias": (d,),
    }
    for i in range(n):
        b = f"{prefix}encoder.layers.{i}."
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{b}self_attn.{p}.weight"] = (d, d)
            out[f"{b}self_attn.{p}.bias"] = (d,)
        out[f"{b}mlp.fc1.weight"], out[f"{b}mlp.fc1.bias"] = (f, d), (f,)
        out[f"{b}mlp.fc2.weight"], out[f"{b}mlp.fc2.bias"] = (d, f), (d,)
        for ln in ("layer_norm1", "layer_norm2"):
            out[f"{b}{ln}.weight"], out[f"{b}{ln}.bias"] = (d,), (d,)
    return out


def openclip_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    """OpenCLIP text-tower shapes as original SD2 / SDXL checkpoints store them (fused in_proj)."""
    d, f, n = CLIP_TINY["hidden_size"], CLIP_TINY["intermediate_size"], CLIP_TINY["num_hidden_layers"]
    out = {
        f"{prefix}token_embedding.weight": (CLIP_TINY["vocab_size"], d),
        f"{prefix}positional_embedding": (CLIP_TINY["max_position_embeddings"], d),
        f"{prefix}ln_final.weight": (d,),
        f"{prefix}ln_final.bias": (d,),
        f"{prefix}text_projection": (d, d),
    }
    for i in range(n):
        b = f"{prefix}transformer.resblocks.{i}."
        out[f"{b}attn.in_proj_weight"], out[f"{b}attn.in_proj_bias"] = (3 * d, d), (3 * d,)
        out[f"{b}attn.out_proj.weight"], out[f"{b}attn.out_proj.bias"] = (d, d), (d,)
        out[f"{b}mlp.c_fc.weight"], out[f"{b}mlp.c_fc.bias"] = (f, d), (f,)
        out[f"{b}mlp.c_proj.weight"], out[f"{b}mlp.c_proj.bias"] = (d, f), (d,)
        for ln in ("ln_1", "ln_2"):
            out[f"{b}{ln}.weight"], out[f"{b}{ln}.bias"] = (d,), (d,)
    return out


def clip_lora_targets() -> dict[str, tuple[int, ...]]:
    """Canonical text-model module paths kohya trains (q/k/v/out, fc1, fc2) -> weight shape."""
    return {k[: -len(".weight")]: s for k, s in clip_hf_shapes().items()
            if k.endswith(".weight") and (".self_attn." in k or ".mlp." in k)}
