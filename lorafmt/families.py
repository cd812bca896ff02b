"""Base-model family detection from canonical module names and shapes (header only) and metadata.

Evidence order: shapes first (cross-attention width, text-encoder width, transformer width), structure
second (which blocks exist), metadata last (``ss_base_model_version``, ``modelspec.architecture``).

aMUSEd (``UVit2DModel``) is told apart by structure alone: its transformer's module tree
(``transformer_layers.N``, ``down_block``/``up_block``, ``mlm_layer``, ``embed``, ``cond_embed``,
``encoder_proj``, ``project_to_hidden``/``project_from_hidden``) shares no root with the MMDiT/Flux transformers
(``transformer_blocks.N`` …), whose ``attn2`` it would otherwise resemble.

A text-encoder-only file (``text_encoder.*`` and nothing else) carries little evidence: aMUSEd's text encoder is
the same CLIP ViT-L/14 text tower as SD1's (768 wide, 12 layers, every shape equal), and SDXL, SD3 and Flux.1 use it
as their first text encoder. Only aMUSEd's ``text_projection`` (it is a ``CLIPTextModelWithProjection``; SD1's is a
``CLIPTextModel``) tells it apart, so a file with a ``text_encoder.text_projection`` module is aMUSEd (SD3, whose
first encoder has one too, would not come with its other two encoders missing). Without it, the file is taken as
SD1, the overwhelmingly common case for kohya and diffusers text-encoder LoRAs, and the evidence says that aMUSEd
(and the first text encoder of the others) fits equally: ``--family`` decides. A kohya file names it ``lora_te1_``
only for a model with several text encoders (SD1/SD2 files say ``lora_te_``): then it is SDXL's CLIP-L, or SD3's or
Flux.1's when the metadata says so.
"""

from __future__ import annotations

import re
from collections import Counter

from lorafmt.algorithms._base import target_shape_of

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    from lorafmt.schema import LoraFile

__all__ = ["AMUSED_ROOTS", "detect_family", "family_from_metadata", "transformer_variant", "CROSS_ATTENTION_WIDTH"]

CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_WIDTH = {768: "sd1", 1024: "sd2"}
# CLIP ViT-L/14's width: SD1's text encoder, and layer for layer aMUSEd's (which adds only a text_projection).
_CLIP_L_WIDTH = 768
# Families whose first text encoder is CLIP-L among others (kohya: lora_te1_, lora_te2_, lora_te3_).
_NUMBERED_TE_FAMILIES = ("sdxl", "sd3", "flux1")


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


# Root modules of diffusers' UVit2DModel (aMUSEd); none of them exists in SD3's or Flux.1's transformer.
AMUSED_ROOTS = (
    "transformer_layers.",
    "down_block.",
    "up_block.",
    "mlm_layer.",
    "embed.",
    "cond_embed.",
    "encoder_proj",
    "project_to_hidden",
    "project_from_hidden",
)
_AMUSED_PREFIXES = tuple(f"transformer.{root}" for root in AMUSED_ROOTS)

_FLUX_WIDTH = 3072
_SD3_WIDTHS = {1536: "medium", 2432: "3.5 large"}
_BLOCK_RE = re.compile(r"^transformer\.transformer_blocks\.(\d+)\.")


def _transformer_width(lora: LoraFile) -> int | None:
    """Hidden width of the transformer: input features of its attention projections (or their modulation)."""
    widths: Counter[int] = Counter()
    for path, module in lora.modules.items():
        if path.startswith("transformer.") and re.search(r"\.(attn2?\.(to_[qkv]|add_[qkv]_proj)|norm1(_context)?\.linear|norm\.linear)$", path):
            shape = target_shape_of(module)
            if shape and len(shape) >= 2:
                widths[shape[1]] += 1
    return widths.most_common(1)[0][0] if widths else None


def _transformer_family(lora: LoraFile) -> tuple[str | None, str]:
    """aMUSEd vs Flux.1 vs SD3 from structure and widths: UVit2DModel's own module tree says aMUSEd (checked
    first: its ``attn2`` cross-attention must not read as SD3.5's); single-stream blocks, guidance embedder or
    width 3072 say Flux; ``attn2`` (SD3.5), the patch-embed conv, a block index above Flux's 19, widths 1536/2432
    or a third text encoder say SD3."""
    paths = lora.modules
    amused = sum(1 for p in paths if p.startswith(_AMUSED_PREFIXES))
    if amused:
        return "amused", f"{amused} UVit2DModel modules (transformer_layers/down_block/up_block/mlm_layer …)"
    width = _transformer_width(lora)
    if any(p.startswith("transformer.single_transformer_blocks.") for p in paths):
        return "flux1", "transformer with single-stream blocks"
    if any(p.startswith("transformer.time_text_embed.guidance_embedder.") for p in paths):
        return "flux1", "transformer with a guidance embedder"
    if width == _FLUX_WIDTH:
        return "flux1", f"transformer width {width}"
    if width in _SD3_WIDTHS:
        return "sd3", f"MMDiT transformer width {width}"
    if any(".attn2." in p for p in paths if p.startswith("transformer.")):
        return "sd3", "dual-attention (attn2) MMDiT blocks"
    if any(p.startswith("transformer.pos_embed.") for p in paths):
        return "sd3", "MMDiT patch embedding"
    if any(int(m.group(1)) >= 19 for p in paths if (m := _BLOCK_RE.match(p))):
        return "sd3", "more joint blocks than Flux.1 has"
    if "text_encoder_3" in set(lora.components):
        return "sd3", "third text encoder (T5) as text_encoder_3"
    return None, ""


def transformer_variant(lora: LoraFile, family: str) -> str | None:
    """Which model of a transformer family, when the file says: Flux.1 ``dev``/``schnell``; SD3 ``medium``,
    ``3.5 medium``, ``3.5 large``; aMUSEd ``amused-512`` (only that variant has the down/up-sampling convs).
    None when undeterminable (e.g. a Flux LoRA without guidance-embedder modules and without metadata fits both
    dev and schnell; an aMUSEd LoRA that leaves the sampling convs alone fits both 256 and 512).

    >>> from lorafmt.schema import LoraFile
    >>> transformer_variant(LoraFile(metadata={"modelspec.architecture": "flux-1-schnell/lora"}), "flux1")
    'schnell'
    """
    arch = lora.metadata.get("modelspec.architecture", "").lower()
    version = lora.metadata.get("ss_base_model_version", "").lower()
    if family == "flux1":
        for v in ("schnell", "dev"):
            if v in arch or version.endswith(v):
                return v
        if any(p.startswith("transformer.time_text_embed.guidance_embedder.") for p in lora.modules):
            return "dev"
        return None
    if family == "amused":
        if any(p.startswith(("transformer.down_block.downsample.", "transformer.up_block.upsample.")) for p in lora.modules):
            return "amused-512"
        return None
    if family == "sd3":
        named = {"medium": "medium", "5-medium": "3.5 medium", "5-large": "3.5 large"}
        if version in named:
            return named[version]
        for key, v in (("3.5-large", "3.5 large"), ("3.5-medium", "3.5 medium"), ("3-medium", "medium")):
            if key in arch:
                return v
        width = _transformer_width(lora)
        if width == 2432:
            return "3.5 large"
        if width == 1536:
            return "3.5 medium" if any(".attn2." in p for p in lora.modules) else "medium"
    return None


def detect_family(lora: LoraFile, *, numbered_text_encoders: bool = False) -> tuple[str | None, list[str]]:
    """Guess the base-model family of a LoRA; returns (family or None, evidence).

    `numbered_text_encoders`: the file names its first text encoder as one of several (kohya ``lora_te1_``), which
    SD1/SD2 files never do; a CLIP-L text-encoder-only file is then SDXL's first encoder (or, when the metadata
    says so, SD3's or Flux.1's), not SD1's.
    """
    votes: Counter[str] = Counter()
    evidence: list[str] = []
    paths = lora.modules
    comps = set(lora.components)

    def vote(family: str, weight: int, why: str) -> None:
        votes[family] += weight
        evidence.append(f"{why} -> {family}")

    # Transformer families (aMUSEd, Flux.1, SD3).
    if "transformer" in comps or "text_encoder_3" in comps:
        fam, why = _transformer_family(lora)
        if fam:
            vote(fam, 10, why)
            variant = transformer_variant(lora, fam)
            if variant:
                evidence.append(f"variant: {variant}")

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
        w = widths.most_common(1)[0][0] if widths else None
        projection = "text_encoder.text_projection" in paths
        if projection and w in (None, _CLIP_L_WIDTH):
            vote("amused", 5, "text_encoder.text_projection: a CLIP-L CLIPTextModelWithProjection, which SD1's is not")
        elif numbered_text_encoders and w in (None, _CLIP_L_WIDTH):
            claimed = family_from_metadata(lora.metadata)
            fam = claimed if claimed in _NUMBERED_TE_FAMILIES else "sdxl"
            vote(fam, 5, f"lora_te1_: text encoder 1 of several (SD1/SD2 files use lora_te_), CLIP-L{' per the metadata' if fam == claimed else ''}")
        elif w in _TE_WIDTH:
            vote(_TE_WIDTH[w], 5, f"text encoder width {w}")
            if w == _CLIP_L_WIDTH and comps == {"text_encoder"}:
                evidence.append(
                    "text-encoder-only CLIP-L file: its modules fit sd1 and amused alike (the same text tower; also the "
                    "first text encoder of sdxl, sd3 and flux1); sd1 assumed, --family decides"
                )

    claimed = family_from_metadata(lora.metadata)
    if claimed:
        vote(claimed, 2, f"metadata says {claimed}")
    if not votes:
        return None, evidence
    ranked = votes.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None, [*evidence, f"tie between {ranked[0][0]} and {ranked[1][0]}"]
    return ranked[0][0], evidence
