"""Base-model family detection from canonical module names and shapes (header only) and metadata.

Evidence order: shapes first (cross-attention width, text-encoder width, transformer width), structure
second (which blocks exist), metadata last (``ss_base_model_version``, ``modelspec.architecture``).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

from lorafmt.algorithms._base import target_shape_of

if TYPE_CHECKING:
    from lorafmt.schema import LoraFile

__all__ = ["detect_family", "family_from_metadata", "CROSS_ATTENTION_WIDTH"]

CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_WIDTH = {768: "sd1", 1024: "sd2"}


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """The family a file's kohya/modelspec metadata claims, if any."""
    arch = metadata.get("modelspec.architecture", "").lower()
    version = metadata.get("ss_base_model_version", "").lower()
    if arch.startswith("stable-diffusion-xl") or version.startswith("sdxl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-3") or version in ("medium", "5-medium", "5-large", "sd3"):
        return "sd3"
    if arch.startswith("flux-1") or version.startswith("flux1"):
        return "flux1"
    if arch.startswith("stable-diffusion-v2") or version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if arch.startswith("stable-diffusion-v1") or version.startswith("sd_v1"):
        return "sd1"
    return None


def detect_family(lora: LoraFile) -> tuple[str | None, list[str]]:
    """Guess the base-model family of a LoRA; returns (family or None, evidence)."""
    votes: Counter[str] = Counter()
    evidence: list[str] = []
    paths = lora.modules
    comps = set(lora.components)

    def vote(family: str, weight: int, why: str) -> None:
        votes[family] += weight
        evidence.append(f"{why} -> {family}")

    # Transformer families (Flux.1, SD3).
    if "transformer" in comps or "text_encoder_3" in comps:
        single = any(".single_transformer_blocks." in p for p in paths)
        widths = Counter()
        for path, module in paths.items():
            if path.startswith("transformer.") and re.search(r"\.attn\.to_[qkv]$", path):
                shape = target_shape_of(module)
                if shape:
                    widths[shape[1]] += 1
        width = widths.most_common(1)[0][0] if widths else None
        if single or width == 3072:
            vote("flux1", 10, f"transformer with {'single blocks' if single else 'width 3072'}")
        elif width in (1536, 2432) or "text_encoder_3" in comps or any(".context_embedder" in p for p in paths):
            vote("sd3", 10, f"MMDiT transformer width {width}")

    # U-Net families: the cross-attention width is decisive.
    cross = Counter()
    for path, module in paths.items():
        if path.startswith("unet.") and re.search(r"\.attn2\.to_[kv]$", path):
            shape = target_shape_of(module)
            if shape and shape[1] in CROSS_ATTENTION_WIDTH:
                cross[CROSS_ATTENTION_WIDTH[shape[1]]] += 1
    if cross:
        fam, n = cross.most_common(1)[0]
        vote(fam, 20, f"{n} cross-attention modules read context width {[k for k, v in CROSS_ATTENTION_WIDTH.items() if v == fam][0]}")
    if "text_encoder_2" in comps and "transformer" not in comps:
        vote("sdxl", 6, "second CLIP text encoder present")
    if any(p.startswith(("unet.add_embedding", "unet.down_blocks.1.attentions.0.transformer_blocks.1")) for p in paths):
        vote("sdxl", 4, "SDXL-only U-Net modules present")
    if any(p.startswith(("unet.down_blocks.3.", "unet.up_blocks.3.")) for p in paths):
        votes["sd1"] += 1
        votes["sd2"] += 1
        evidence.append("fourth U-Net level present -> sd1/sd2")
    if "text_encoder" in comps and "text_encoder_2" not in comps and "transformer" not in comps:
        widths = Counter()
        for path, module in paths.items():
            if path.startswith("text_encoder.") and re.search(r"\.self_attn\.q_proj$", path):
                shape = target_shape_of(module)
                if shape:
                    widths[shape[1]] += 1
        if widths:
            w = widths.most_common(1)[0][0]
            if w in _TE_WIDTH:
                vote(_TE_WIDTH[w], 5, f"text encoder width {w}")

    claimed = family_from_metadata(lora.metadata)
    if claimed:
        vote(claimed, 2, f"metadata says {claimed}")
    if not votes:
        return None, evidence
    ranked = votes.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None, [*evidence, f"tie between {ranked[0][0]} and {ranked[1][0]}"]
    return ranked[0][0], evidence
