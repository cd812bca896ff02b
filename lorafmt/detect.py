"""Layout detection: every layout scores the source from its header alone; the best clear winner is taken."""

from __future__ import annotations

import sys
import types

from lorafmt.errors import (
    AmbiguousLayoutError,
    EmbeddingFileError,
    EmptyFileError,
    FullCheckpointError,
    NotALoraError,
    UnknownLayoutError,
    VaeFileError,
)
from lorafmt.io.source import Source
from lorafmt.layouts import available_layouts
from lorafmt.layouts._base import Match

__all__ = ["score_layouts", "pick_layout", "not_a_lora", "MIN_SCORE", "MARGIN"]

MIN_SCORE = 50  # a layout must explain at least half the keys
MARGIN = 5  # and beat the runner-up by this many points

# What people pass off as LoRAs, recognised by key prefixes: (error class, description, prefixes).
# Keys that look like adapter parameters are not counted (a broken LoRA is still a LoRA).
_NOT_LORA_KINDS: tuple[tuple[type[NotALoraError], str, tuple[str, ...]], ...] = (
    (FullCheckpointError, "a full Stable Diffusion checkpoint (model.diffusion_model.*)", ("model.diffusion_model.",)),
    (FullCheckpointError, "a full Stable Diffusion checkpoint (VAE and text encoder included)", ("first_stage_model.", "cond_stage_model.")),
    (FullCheckpointError, "a full SDXL checkpoint's text encoders (conditioner.embedders.*)", ("conditioner.embedders.",)),
    (FullCheckpointError, "a full Flux.1 transformer (BFL names)", ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "final_layer.")),
    (FullCheckpointError, "a full SD3 MMDiT (SAI names)", ("joint_blocks.", "x_embedder.", "t_embedder.", "y_embedder.")),
    (FullCheckpointError, "a full diffusers U-Net (diffusion_pytorch_model)", ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "time_embedding.", "add_embedding.", "conv_norm_out.")),
    (FullCheckpointError, "a full diffusers transformer (diffusion_pytorch_model)", ("transformer_blocks.", "single_transformer_blocks.", "context_embedder.", "time_text_embed.", "pos_embed.", "norm_out.", "proj_out.")),
    (FullCheckpointError, "a full CLIP text encoder", ("text_model.", "text_projection.", "text_encoders.")),
    (FullCheckpointError, "a full T5 text encoder", ("encoder.block.", "shared.", "encoder.embed_tokens.", "encoder.final_layer_norm.")),
    (FullCheckpointError, "a ControlNet", ("control_model.", "controlnet_", "input_hint_block.", "zero_convs.")),
    (VaeFileError, "a VAE", ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "vae.")),
)
_ADAPTER_MARKERS = ("lora", "hada_", "lokr_", "oft_", "alpha", "dora_scale", "diff_b", "w_norm", "on_input")
_EMBEDDING_KEYS = frozenset({"emb_params", "clip_l", "clip_g", "string_to_param", "*"})


def not_a_lora(keys: list[str]) -> tuple[type[NotALoraError], str] | None:
    """What a set of keys is when it is a known non-LoRA thing (full model, embedding, VAE), else None."""
    if not keys:
        return None
    if all(k in _EMBEDDING_KEYS or k.startswith("string_to_param.") for k in keys):
        which = "SDXL " if any(k in ("clip_l", "clip_g") for k in keys) else ""
        return EmbeddingFileError, f"a {which}textual-inversion embedding"
    plain = [k for k in keys if not any(m in k.lower() for m in _ADAPTER_MARKERS)]
    if len(plain) <= 0.5 * len(keys):  # at least half the keys are adapter parameters: a (maybe broken) LoRA
        return None
    best: tuple[int, type[NotALoraError], str] | None = None
    for cls, what, prefixes in _NOT_LORA_KINDS:
        if cls is VaeFileError:
            # T5 ("encoder.block.") and CLIP keys start with encoder. too; count only VAE-shaped ones.
            hits = sum(1 for k in plain if k.startswith(prefixes) and not k.startswith(("encoder.block.", "encoder.embed_tokens.", "encoder.final_layer_norm.", "encoder.layers.")))
        else:
            hits = sum(1 for k in plain if k.startswith(prefixes))
        if hits and (best is None or hits > best[0]):
            best = (hits, cls, what)
    if best is not None and best[0] >= 0.2 * len(keys):
        return best[1], best[2]
    return None


def _what_it_is(source: Source) -> tuple[type[NotALoraError], str] | None:
    keys = list(source.tensors) if source.kind != "dir" else [k for p in source.parts.values() for k in p.tensors]
    return not_a_lora(keys)


def score_layouts(source: Source) -> list[Match]:
    """Every layout's match on `source`, best first."""
    matches = [m for layout in available_layouts() if layout.capabilities.readable for m in [layout.sniff(source)] if m]
    return sorted(matches, key=lambda m: -m.score)


def pick_layout(source: Source) -> tuple[Match, list[Match]]:
    """The winning match and all matches; raises when nothing (or several things) fit."""
    matches = score_layouts(source)
    if not matches or matches[0].score < MIN_SCORE:
        found = _what_it_is(source)
        if found:
            cls, what = found
            msg = f"this is not a LoRA: it looks like {what}"
            raise cls(msg, file=source.name)
        if not matches:
            n = len(source.all_keys())
            if not n:
                msg = "file holds no tensors" + (f" (only {len(source.metadata)} metadata entries)" if source.metadata else "")
                raise EmptyFileError(msg, file=source.name)
            sample = ", ".join(sorted(source.all_keys())[:3])
            msg = f"no known LoRA layout matches its {n} keys (e.g. {sample})"
            raise UnknownLayoutError(msg, file=source.name, hint="run `lorafmt layouts` to list the layouts lorafmt reads")
        best = matches[0]
        msg = f"best layout match {best.layout!r} explains only {best.score}% of the keys"
        raise UnknownLayoutError(msg, file=source.name, hint="; ".join(best.evidence))
    if len(matches) > 1 and matches[0].score - matches[1].score < MARGIN:
        names = ", ".join(f"{m.layout} ({m.score})" for m in matches[:3])
        msg = f"ambiguous layout: candidates {names}"
        raise AmbiguousLayoutError(msg, file=source.name, hint="pass --from LAYOUT to choose")
    return matches[0], matches


class _CallableModule(types.ModuleType):
    """``lorafmt.detect`` is both this module and the public function :func:`lorafmt.api.detect`.

    Importing this module (as :mod:`lorafmt.api` does) binds the package attribute ``lorafmt.detect`` to the
    module, shadowing the lazily exported function; calling the module forwards to the function, so
    ``lorafmt.detect(path)`` works whatever was imported first.
    """

    def __call__(self, *args, **kwargs):
        from lorafmt.api import detect

        return detect(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
