"""Layout detection: every layout scores the source from its header alone; the best clear winner is taken."""

from __future__ import annotations

from lorafmt.errors import AmbiguousLayoutError, NotALoraError, UnknownLayoutError
from lorafmt.io.source import Source
from lorafmt.layouts import available_layouts
from lorafmt.layouts._base import Match

__all__ = ["score_layouts", "pick_layout", "MIN_SCORE", "MARGIN"]

MIN_SCORE = 50  # a layout must explain at least half the keys
MARGIN = 5  # and beat the runner-up by this many points

# Key fragments of things people pass off as LoRAs (full checkpoints, VAEs, embeddings).
_NOT_LORA_SIGNS = (
    ("model.diffusion_model.", "a full Stable Diffusion checkpoint (model.diffusion_model.*)"),
    ("first_stage_model.", "a full Stable Diffusion checkpoint (includes a VAE)"),
    ("cond_stage_model.", "a full checkpoint's text encoder"),
    ("conditioner.embedders.", "a full SDXL checkpoint's text encoders"),
    ("encoder.down_blocks.", "a VAE"),
    ("decoder.up_blocks.", "a VAE"),
    ("string_to_param", "a textual-inversion embedding"),
    ("emb_params", "a textual-inversion embedding"),
    ("clip_l", "a textual-inversion embedding (SDXL)"),
    ("double_blocks.0.img_attn.qkv.weight", "a full Flux transformer"),
    ("down_blocks.0.attentions.0.proj_in.weight", "a full diffusers U-Net"),
    ("transformer_blocks.0.attn.to_q.weight", "a full diffusers transformer"),
)


def score_layouts(source: Source) -> list[Match]:
    """Every layout's match on `source`, best first."""
    matches = [m for layout in available_layouts() if layout.capabilities.readable for m in [layout.sniff(source)] if m]
    return sorted(matches, key=lambda m: -m.score)


def _what_it_is(source: Source) -> str | None:
    keys = list(source.tensors) if source.kind != "dir" else [k for p in source.parts.values() for k in p.tensors]
    for fragment, what in _NOT_LORA_SIGNS:
        hits = sum(1 for k in keys if fragment in k)
        if hits and (hits >= 0.2 * len(keys) or fragment in ("string_to_param", "emb_params")):
            return what
    if keys and all(k in ("clip_l", "clip_g") for k in keys):
        return "a textual-inversion embedding (SDXL)"
    return None


def pick_layout(source: Source) -> tuple[Match, list[Match]]:
    """The winning match and all matches; raises when nothing (or several things) fit."""
    matches = score_layouts(source)
    if not matches or matches[0].score < MIN_SCORE:
        what = _what_it_is(source)
        if what:
            msg = f"this is not a LoRA: it looks like {what}"
            raise NotALoraError(msg, file=source.name)
        if not matches:
            n = len(source.all_keys())
            sample = ", ".join(sorted(source.all_keys())[:3])
            msg = f"no known LoRA layout matches its {n} keys (e.g. {sample})" if n else "file holds no tensors"
            raise UnknownLayoutError(msg, file=source.name, hint="run `lorafmt layouts` to list the layouts lorafmt reads")
        best = matches[0]
        msg = f"best layout match {best.layout!r} explains only {best.score}% of the keys"
        raise UnknownLayoutError(msg, file=source.name, hint="; ".join(best.evidence))
    if len(matches) > 1 and matches[0].score - matches[1].score < MARGIN:
        names = ", ".join(f"{m.layout} ({m.score})" for m in matches[:3])
        msg = f"ambiguous layout: candidates {names}"
        raise AmbiguousLayoutError(msg, file=source.name, hint="pass --from LAYOUT to choose")
    return matches[0], matches
