"""SD U-Net names: LDM/SGM (``input_blocks.4.1``) <-> diffusers (``down_blocks.1.attentions.0``).

Arithmetic from the block structure (formats.md §4.2/4.3; kohya ``sdxl_model_util.make_unet_conversion_map``,
diffusers ``_maybe_map_sgm_blocks_to_diffusers``): ``layers_per_block`` resnets per down level, one more per
up level, one slot per down level for the downsampler, attention on the levels listed below.
"""

from __future__ import annotations

import re
from lorafmt._record import Record

__all__ = ["UNetLayout", "UNET_LAYOUTS", "sgm_to_diffusers", "diffusers_to_sgm", "is_sgm_path"]


class UNetLayout(Record, frozen=True):
    levels: int
    layers_per_block: int
    down_attention: frozenset[int]
    up_attention: frozenset[int]


UNET_LAYOUTS = {
    "sd1": UNetLayout(4, 2, frozenset({0, 1, 2}), frozenset({1, 2, 3})),
    "sd2": UNetLayout(4, 2, frozenset({0, 1, 2}), frozenset({1, 2, 3})),
    "sdxl": UNetLayout(3, 2, frozenset({1, 2}), frozenset({0, 1})),
}

_RESNET_SGM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_SGM = {v: k for k, v in _RESNET_SGM_TO_DIFFUSERS.items()}

_TOP_SGM_TO_DIFFUSERS = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_TOP_DIFFUSERS_TO_SGM = {v: k for k, v in _TOP_SGM_TO_DIFFUSERS.items()}

_SGM_RE = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)(\.|$)")


def is_sgm_path(path: str) -> bool:
    """True for U-Net paths in LDM/SGM spelling."""
    return bool(_SGM_RE.match(path))


def _split_rest(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def sgm_to_diffusers(path: str, layout: UNetLayout) -> str | None:
    """Map an SGM/LDM U-Net module path to its diffusers path; None when the path is not valid for `layout`.

    >>> sgm_to_diffusers("input_blocks.4.1.transformer_blocks.0.attn1.to_q", UNET_LAYOUTS["sdxl"])
    'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q'
    >>> sgm_to_diffusers("output_blocks.5.0.skip_connection", UNET_LAYOUTS["sdxl"])
    'up_blocks.1.resnets.2.conv_shortcut'
    """
    for old, new in _TOP_SGM_TO_DIFFUSERS.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    parts = path.split(".")
    per_down = layout.layers_per_block + 1
    try:
        if parts[0] == "input_blocks":
            n, m, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
            if n < 1:
                return None
            i, j = (n - 1) // per_down, (n - 1) % per_down
            if i >= layout.levels:
                return None
            if j == layout.layers_per_block:  # downsampler slot
                if m != 0 or i == layout.levels - 1 or not (rest == "op" or rest.startswith("op.")):
                    return None
                return _join(f"down_blocks.{i}.downsamplers.0.conv", rest[3:])
            if m == 0:
                return _join(f"down_blocks.{i}.resnets.{j}", _split_rest(rest, _RESNET_SGM_TO_DIFFUSERS))
            if m == 1 and i in layout.down_attention:
                return _join(f"down_blocks.{i}.attentions.{j}", rest)
            return None
        if parts[0] == "middle_block":
            k, rest = int(parts[1]), ".".join(parts[2:])
            if k == 1:
                return _join("mid_block.attentions.0", rest)
            if k in (0, 2):
                return _join(f"mid_block.resnets.{k // 2}", _split_rest(rest, _RESNET_SGM_TO_DIFFUSERS))
            return None
        if parts[0] == "output_blocks":
            n, m, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
            i, j = n // per_down, n % per_down
            if i >= layout.levels:
                return None
            if m == 0:
                return _join(f"up_blocks.{i}.resnets.{j}", _split_rest(rest, _RESNET_SGM_TO_DIFFUSERS))
            has_attn = i in layout.up_attention
            upsampler_slot = 2 if has_attn else 1
            if m == upsampler_slot and j == layout.layers_per_block and i < layout.levels - 1:
                if rest == "conv" or rest.startswith("conv."):
                    return _join(f"up_blocks.{i}.upsamplers.0.conv", rest[5:])
                return None
            if m == 1 and has_attn:
                return _join(f"up_blocks.{i}.attentions.{j}", rest)
            return None
    except (IndexError, ValueError):
        return None
    return None


_DIFF_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")


def diffusers_to_sgm(path: str, layout: UNetLayout) -> str | None:
    """Inverse of :func:`sgm_to_diffusers`.

    >>> diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", UNET_LAYOUTS["sdxl"])
    'output_blocks.2.2.conv'
    """
    for old, new in _TOP_DIFFUSERS_TO_SGM.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    per_down = layout.layers_per_block + 1
    if path.startswith("mid_block."):
        parts = path.split(".")
        if len(parts) < 3:
            return None
        kind, idx, rest = parts[1], parts[2], ".".join(parts[3:])
        if kind == "attentions" and idx == "0":
            return _join("middle_block.1", rest)
        if kind == "resnets" and idx in ("0", "1"):
            return _join(f"middle_block.{2 * int(idx)}", _split_rest(rest, _RESNET_DIFFUSERS_TO_SGM))
        return None
    m = _DIFF_RE.match(path)
    if not m:
        return None
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
    if side == "down_blocks":
        if kind == "resnets":
            return _join(f"input_blocks.{per_down * i + j + 1}.0", _split_rest(rest, _RESNET_DIFFUSERS_TO_SGM))
        if kind == "attentions":
            return _join(f"input_blocks.{per_down * i + j + 1}.1", rest)
        if kind == "downsamplers" and (rest == "conv" or rest.startswith("conv.")):
            return _join(f"input_blocks.{per_down * (i + 1)}.0.op", rest[5:])
        return None
    if kind == "resnets":
        return _join(f"output_blocks.{per_down * i + j}.0", _split_rest(rest, _RESNET_DIFFUSERS_TO_SGM))
    if kind == "attentions":
        return _join(f"output_blocks.{per_down * i + j}.1", rest)
    if kind == "upsamplers" and (rest == "conv" or rest.startswith("conv.")):
        slot = 2 if i in layout.up_attention else 1
        return _join(f"output_blocks.{per_down * i + layout.layers_per_block}.{slot}.conv", rest[5:])
    return None
