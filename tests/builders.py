"""Small LoRA state dicts with real module names and shapes, for tests.

Shapes are those of the real SD1.5 / SD2.1 / SDXL U-Nets and CLIP encoders (a handful of modules each).
"""

from __future__ import annotations

import numpy as np

# canonical path -> base weight shape (out, in[, kh, kw]) of the real models
SD1_MODULES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (320, 320),
    "unet.down_blocks.0.attentions.0.proj_in": (320, 320, 1, 1),
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": (10240, 1280),
    "unet.up_blocks.1.resnets.0.conv1": (1280, 2560, 3, 3),
    "unet.down_blocks.0.downsamplers.0.conv": (320, 320, 3, 3),
    "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v": (320, 768),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
    "text_encoder.text_model.encoder.layers.11.mlp.fc2": (768, 3072),
}
SD2_MODULES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 1024),
    "unet.down_blocks.0.attentions.0.proj_in": (320, 320),
    "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q": (320, 320),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (1024, 1024),
}
SDXL_MODULES = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640),
    "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": (640, 2048),
    "unet.down_blocks.2.attentions.1.proj_in": (1280, 1280),
    "unet.mid_block.attentions.0.transformer_blocks.9.ff.net.2": (1280, 5120),
    "unet.up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0": (1280, 1280),
    "unet.down_blocks.0.resnets.0.conv1": (320, 320, 3, 3),
    "unet.up_blocks.0.upsamplers.0.conv": (1280, 1280, 3, 3),
    "unet.down_blocks.0.downsamplers.0.conv": (320, 320, 3, 3),
    "unet.mid_block.resnets.1.time_emb_proj": (1280, 1280),
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": (768, 768),
    "text_encoder_2.text_model.encoder.layers.31.mlp.fc1": (5120, 1280),
}
FLUX1_MODULES = {
    "transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
    "transformer.transformer_blocks.0.attn.to_k": (3072, 3072),
    "transformer.transformer_blocks.0.attn.to_v": (3072, 3072),
    "transformer.transformer_blocks.0.attn.to_out.0": (3072, 3072),
    "transformer.transformer_blocks.0.attn.add_q_proj": (3072, 3072),
    "transformer.transformer_blocks.0.ff.net.0.proj": (12288, 3072),
    "transformer.transformer_blocks.0.norm1.linear": (18432, 3072),
    "transformer.single_transformer_blocks.0.attn.to_q": (3072, 3072),
    "transformer.single_transformer_blocks.0.proj_mlp": (12288, 3072),
    "transformer.single_transformer_blocks.0.proj_out": (3072, 15360),
    "transformer.x_embedder": (3072, 64),
    "transformer.context_embedder": (3072, 4096),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
}
SD3_MODULES = {
    "transformer.transformer_blocks.0.attn.to_q": (1536, 1536),
    "transformer.transformer_blocks.0.attn.add_k_proj": (1536, 1536),
    "transformer.transformer_blocks.0.ff.net.2": (1536, 6144),
    "transformer.transformer_blocks.3.attn.to_out.0": (1536, 1536),
    "transformer.context_embedder": (1536, 4096),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
}
FAMILY_MODULES = {"sd1": SD1_MODULES, "sd2": SD2_MODULES, "sdxl": SDXL_MODULES, "flux1": FLUX1_MODULES, "sd3": SD3_MODULES}


def factors(shape: tuple[int, ...], rank: int, rng: np.random.Generator, dtype=np.float16):
    """(down, up) with the kohya/PEFT shapes for a base weight of `shape`."""
    out, inp = shape[0], shape[1]
    if len(shape) == 4:
        down = rng.standard_normal((rank, inp, *shape[2:])) * 0.05
        up = rng.standard_normal((out, rank, 1, 1)) * 0.05
    else:
        down = rng.standard_normal((rank, inp)) * 0.05
        up = rng.standard_normal((out, rank)) * 0.05
    return down.astype(dtype), up.astype(dtype)


def canonical_factors(family: str, rank: int = 4, seed: int = 0, dtype=np.float16, alphas=None):
    """{path: (down, up, alpha)} for the family's module table; alphas cycles through `alphas`."""
    rng = np.random.default_rng(seed)
    alphas = alphas or [None]
    out = {}
    for i, (path, shape) in enumerate(FAMILY_MODULES[family].items()):
        down, up = factors(shape, rank, rng, dtype)
        out[path] = (down, up, alphas[i % len(alphas)])
    return out


def lora_from_factors(family: str, entries: dict, dtype: str = "F16"):
    """A canonical LoraFile built in memory from {path: (down, up, alpha)}."""
    from lorafmt.schema import LoraFile, Module, TensorRef

    modules = {}
    for path, (down, up, alpha) in entries.items():
        modules[path] = Module(
            path=path,
            tensors={"down": TensorRef.from_array(f"{path}.down", down, dtype), "up": TensorRef.from_array(f"{path}.up", up, dtype)},
            alpha=alpha,
        )
    return LoraFile(family=family, modules=modules)


def sample_lora(family: str = "sd1", rank: int = 4, seed: int = 0, alphas=(2.0, None, 1.5, 4.0)):
    return lora_from_factors(family, canonical_factors(family, rank=rank, seed=seed, alphas=list(alphas)))
