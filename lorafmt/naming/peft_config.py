"""PEFT ``LoraConfig`` arithmetic shared by the ``diffusers`` (header metadata) and ``peft`` (adapter_config.json)
layouts: per-module rank and alpha from ``r``/``lora_alpha``/``rank_pattern``/``alpha_pattern``/``use_rslora``,
and the inverse: the smallest config that reproduces a set of per-module ranks and alphas exactly.
"""

from __future__ import annotations

import math
import re
from collections import Counter

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command
if TYPE_CHECKING:
    from typing import Any

__all__ = ["pattern_value", "module_pattern", "config_for_modules", "canonical_alpha", "config_alpha"]


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    """What PEFT picks for module `name` (``peft.utils.other.get_pattern_key``: first key k with
    ``re.match(rf"(.*\\.)?({k})$", name)``)."""
    # CLIP module names lost their ``text_model.`` level in transformers 5; configs may use either spelling.
    if not isinstance(patterns, dict):  # absent, or junk from a hand-edited config
        return default
    names = [name, name[len("text_model.") :]] if name.startswith("text_model.") else [name]
    for key, value in patterns.items():
        for candidate in names:
            try:
                if re.match(rf"(.*\.)?({key})$", candidate):
                    return value
            except re.error:
                break
    return default


def config_alpha(cfg: dict[str, Any], rel: str, rank: int) -> float:
    """The canonical alpha a PEFT/diffusers config gives module `rel` of rank `rank`.

    Raises ValueError (with a one-line reason) when the config is not what PEFT would accept: a non-object
    ``alpha_pattern``, a non-numeric or non-finite/non-positive ``lora_alpha``. Configs come from the file.
    """
    patterns = cfg.get("alpha_pattern")
    if patterns is not None and not isinstance(patterns, dict):
        msg = f"alpha_pattern is a {type(patterns).__name__}, not an object"
        raise ValueError(msg)
    alpha = pattern_value(patterns, rel, cfg.get("lora_alpha", rank))
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        msg = f"config alpha {alpha!r} for this module is not a positive finite number"
        raise ValueError(msg)
    return float(canonical_alpha(float(alpha), rank, bool(cfg.get("use_rslora"))))


def module_pattern(rel: str, *, text_encoder: bool) -> str:
    """An anchored pattern matching exactly one module (``^`` as diffusers writes since peft#2419).

    CLIP text encoders lost their ``text_model`` level in transformers 5, so their patterns accept both spellings.
    """
    if text_encoder and rel.startswith("text_model."):
        return r"^(?:text_model\.)?" + re.escape(rel[len("text_model.") :])
    return "^" + re.escape(rel)


def canonical_alpha(lora_alpha: float, rank: int, use_rslora: bool) -> float:
    """Canonical alpha (scale = alpha / rank) from PEFT's: rsLoRA scales by alpha / sqrt(rank)."""
    return lora_alpha * rank / math.sqrt(rank) if use_rslora else lora_alpha


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(counts: Counter, default):
    """The most frequent value; ties go to the smallest, so the result never depends on module order."""
    if not counts:
        return default
    return max(sorted(counts), key=lambda v: counts[v])


def config_for_modules(modules: dict[str, tuple[int, float]], *, text_encoder: bool) -> dict[str, Any]:
    """``{rel path: (rank, alpha)}`` -> LoraConfig fields (r, lora_alpha, rank_pattern, alpha_pattern, target_modules)."""
    ranks = Counter(r for r, _ in modules.values())
    alphas = Counter(a for _, a in modules.values())
    r = _most_common(ranks, 8)
    alpha = _most_common(alphas, r)
    rank_pattern = {}
    alpha_pattern = {}
    targets = []
    for rel, (mr, ma) in sorted(modules.items()):
        targets.append(rel[len("text_model.") :] if text_encoder and rel.startswith("text_model.") else rel)
        if mr != r:
            rank_pattern[module_pattern(rel, text_encoder=text_encoder)] = mr
        if ma != alpha:
            alpha_pattern[module_pattern(rel, text_encoder=text_encoder)] = _number(ma)
    return {
        "r": r,
        "lora_alpha": _number(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
    }
