"""Real module shapes of the target architectures, for generated test LoRAs.

When :mod:`lorafmt.architectures` is available the shapes come from the shipped architecture data (generated
from the real diffusers/transformers model classes). Otherwise a built-in table covers the LoRA targets of SD1.x
and SDXL (attention, feed-forward and transformer projections of the U-Net, attention and MLP of the CLIP text
encoders), written out from the diffusers ``UNet2DConditionModel`` configs of
``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-xl-base-1.0``.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["module_shapes", "builtin_families", "LORA_TARGET_RE"]

#: Module paths a typical LoRA trains (attention, feed-forward, transformer projections, text-encoder attn/MLP).
LORA_TARGET_RE = re.compile(
    r"(\.attn[12]\.to_(q|k|v|out\.0)|\.ff\.net\.(0\.proj|2)|\.attentions\.\d+\.proj_(in|out)"
    r"|\.self_attn\.(q|k|v|out)_proj|\.mlp\.fc[12]"
    r"|\.attn\.(to_(q|k|v|out\.0)|add_(q|k|v)_proj|to_add_out)|\.proj_mlp|\.proj_out)$"
)


def _transformer_block(prefix: str, c: int, ctx: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.attn1.to_q": (c, c),
        f"{prefix}.attn1.to_k": (c, c),
        f"{prefix}.attn1.to_v": (c, c),
        f"{prefix}.attn1.to_out.0": (c, c),
        f"{prefix}.attn2.to_q": (c, c),
        f"{prefix}.attn2.to_k": (c, ctx),
        f"{prefix}.attn2.to_v": (c, ctx),
        f"{prefix}.attn2.to_out.0": (c, c),
        f"{prefix}.ff.net.0.proj": (8 * c, c),
        f"{prefix}.ff.net.2": (c, 4 * c),
    }


def _attention(prefix: str, c: int, ctx: int, depth: int, linear_proj: bool) -> dict[str, tuple[int, ...]]:
    proj = (c, c) if linear_proj else (c, c, 1, 1)
    out = {f"{prefix}.proj_in": proj}
    for b in range(depth):
        out.update(_transformer_block(f"{prefix}.transformer_blocks.{b}", c, ctx))
    out[f"{prefix}.proj_out"] = proj
    return out


def _clip(component: str, width: int, layers: int, mlp: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for i in range(layers):
        p = f"{component}.text_model.encoder.layers.{i}"
        for n in ("q", "k", "v", "out"):
            out[f"{p}.self_attn.{n}_proj"] = (width, width)
        out[f"{p}.mlp.fc1"] = (mlp, width)
        out[f"{p}.mlp.fc2"] = (width, mlp)
    return out


def _sd1() -> dict[str, tuple[int, ...]]:
    ch, ctx = (320, 640, 1280, 1280), 768
    out: dict[str, tuple[int, ...]] = {}
    for level in (0, 1, 2):
        for a in range(2):
            out.update(_attention(f"unet.down_blocks.{level}.attentions.{a}", ch[level], ctx, 1, False))
    out.update(_attention("unet.mid_block.attentions.0", 1280, ctx, 1, False))
    for level in (1, 2, 3):
        for a in range(3):
            out.update(_attention(f"unet.up_blocks.{level}.attentions.{a}", ch[3 - level], ctx, 1, False))
    out.update(_clip("text_encoder", 768, 12, 3072))
    return out


def _sdxl() -> dict[str, tuple[int, ...]]:
    ctx = 2048
    out: dict[str, tuple[int, ...]] = {}
    for level, c, depth in ((1, 640, 2), (2, 1280, 10)):
        for a in range(2):
            out.update(_attention(f"unet.down_blocks.{level}.attentions.{a}", c, ctx, depth, True))
    out.update(_attention("unet.mid_block.attentions.0", 1280, ctx, 10, True))
    for level, c, depth in ((0, 1280, 10), (1, 640, 2)):
        for a in range(3):
            out.update(_attention(f"unet.up_blocks.{level}.attentions.{a}", c, ctx, depth, True))
    out.update(_clip("text_encoder", 768, 12, 3072))
    out.update(_clip("text_encoder_2", 1280, 32, 5120))
    return out


_BUILTIN = {"sd1": _sd1, "sdxl": _sdxl}


def builtin_families() -> tuple[str, ...]:
    return tuple(_BUILTIN)


@lru_cache(maxsize=None)
def module_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Canonical module path -> base weight shape, for the modules a LoRA typically targets in `family`.

    Example:
        >>> module_shapes("sd1")["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
        (320, 768)
    """
    try:
        from lorafmt import architectures  # lands with the architecture data
    except ImportError:
        architectures = None
    if architectures is not None:
        try:
            arch = architectures.load(family)
        except Exception:  # noqa: BLE001 - unknown family or data missing: fall back to the table
            arch = None
        if arch is not None:
            shapes = {
                path: tuple(spec.weight_shape)
                for path, spec in arch.modules.items()
                if spec.kind in ("linear", "conv2d") and LORA_TARGET_RE.search(path)
            }
            if shapes:
                return shapes
    if family not in _BUILTIN:
        from lorafmt.errors import SourceError

        msg = f"no module shapes for family {family!r}; built-in: {', '.join(_BUILTIN)}"
        raise SourceError(msg)
    return _BUILTIN[family]()
