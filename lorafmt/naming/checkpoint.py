"""Canonical module paths -> tensor keys of original single-file SD1.x / SD2.x / SDXL checkpoints.

Original (CompVis LDM / Stability SGM) checkpoints keep the whole pipeline in one file:

==========  ==================================================  =============================================
family      U-Net                                               text encoders
==========  ==================================================  =============================================
``sd1``     ``model.diffusion_model.<LDM path>``                 ``cond_stage_model.transformer.text_model.*`` (HF CLIP-L)
``sd2``     ``model.diffusion_model.<LDM path>``                 ``cond_stage_model.model.transformer.resblocks.N.*`` (OpenCLIP-H)
``sdxl``    ``model.diffusion_model.<SGM path>``                 ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L),
                                                                 ``conditioner.embedders.1.model.transformer.resblocks.N.*`` (bigG)
==========  ==================================================  =============================================

OpenCLIP fuses q, k and v into one ``attn.in_proj_weight`` of shape ``(3·d, d)``: a ``q_proj`` LoRA lands in
rows ``[0, d)``, ``k_proj`` in ``[d, 2d)``, ``v_proj`` in ``[2d, 3d)`` — the split diffusers'
``convert_open_clip_checkpoint`` undoes, and the one A1111 applies kohya q/k/v LoRAs to (formats.md §4.4).

Example:
    >>> t = checkpoint_target("text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj", "sdxl")
    >>> t.key, t.rows
    ('conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight', (1, 3))
    >>> checkpoint_target("unet.down_blocks.1.attentions.0.proj_in", "sd1").key
    'model.diffusion_model.input_blocks.4.1.proj_in.weight'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from lorafmt.naming.sd_unet import UNET_LAYOUTS, diffusers_to_sgm

__all__ = ["CheckpointTarget", "checkpoint_target", "checkpoint_family", "UNET_PREFIX", "TEXT_PREFIXES"]

UNET_PREFIX = "model.diffusion_model."

# family -> component -> (prefix, kind); kind "hf" keeps transformers CLIP names, "openclip" renames.
TEXT_PREFIXES: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
}

_OPENCLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_OPENCLIP_SUB = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


@dataclass(frozen=True)
class CheckpointTarget:
    """Where a canonical module's weight lives in an original checkpoint.

    Attributes:
        key: the checkpoint tensor key (``….weight`` or ``….in_proj_weight``).
        rows: ``(index, parts)`` when the module owns row block ``index`` of ``parts`` equal blocks
            (OpenCLIP q/k/v in ``in_proj_weight``), else None.
        bias_key: the key of the matching bias, if the module has one in this layout.
    """

    key: str
    rows: tuple[int, int] | None = None
    bias_key: str | None = None

    def row_slice(self, total_rows: int) -> slice | None:
        """The row slice of a ``total_rows``-row tensor this target owns (None = the whole tensor)."""
        if self.rows is None:
            return None
        index, parts = self.rows
        size = total_rows // parts
        return slice(index * size, (index + 1) * size)


def checkpoint_family(keys: Iterable[str]) -> str | None:
    """``sd1``, ``sd2`` or ``sdxl`` from an original checkpoint's keys; None when it is not one.

    >>> checkpoint_family(["model.diffusion_model.out.2.weight", "cond_stage_model.model.ln_final.weight"])
    'sd2'
    """
    unet = sdxl = sd2 = sd1 = False
    for k in keys:
        if k.startswith(UNET_PREFIX):
            unet = True
            if k.startswith(UNET_PREFIX + "label_emb."):
                sdxl = True
        elif k.startswith("conditioner.embedders."):
            sdxl = True
        elif k.startswith("cond_stage_model.model."):
            sd2 = True
        elif k.startswith("cond_stage_model.transformer."):
            sd1 = True
    if sdxl:
        return "sdxl"
    if sd2:
        return "sd2"
    if sd1 or unet:
        return "sd1"
    return None


def _openclip(rel: str) -> tuple[str, tuple[int, int] | None, bool] | None:
    """HF CLIP module path -> (OpenCLIP module path, rows, has_bias)."""
    m = _OPENCLIP_LAYER.match(rel)
    if not m:
        return None
    layer, rest = m.groups()
    base = f"transformer.resblocks.{layer}"
    if rest.startswith("self_attn.") and rest[len("self_attn.") :] in _QKV:
        return f"{base}.attn.in_proj", (_QKV[rest[len("self_attn.") :]], 3), True
    for old, new in _OPENCLIP_SUB.items():
        if rest == old:
            return f"{base}.{new}", None, True
    return None


def checkpoint_target(path: str, family: str) -> CheckpointTarget | None:
    """The checkpoint tensor a canonical module path patches, for an original `family` checkpoint.

    Returns None when the module has no place in that checkpoint (e.g. a ``text_encoder_2`` path in SD1).
    """
    component, _, rel = path.partition(".")
    if component == "unet":
        layout = UNET_LAYOUTS.get(family)
        if layout is None:
            return None
        sgm = diffusers_to_sgm(rel, layout)
        if sgm is None:
            return None
        base = UNET_PREFIX + sgm
        return CheckpointTarget(base + ".weight", None, base + ".bias")
    spec = TEXT_PREFIXES.get(family, {}).get(component)
    if spec is None:
        return None
    prefix, kind = spec
    if not rel.startswith("text_model."):
        rel = "text_model." + rel  # transformers 5 CLIP spelling
    if kind == "hf":
        base = prefix + rel
        return CheckpointTarget(base + ".weight", None, base + ".bias")
    found = _openclip(rel)
    if found is None:
        return None
    mod, rows, _ = found
    if rows is not None:
        return CheckpointTarget(prefix + mod + "_weight", rows, prefix + mod + "_bias")
    return CheckpointTarget(prefix + mod + ".weight", None, prefix + mod + ".bias")
