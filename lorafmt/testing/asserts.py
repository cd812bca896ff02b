"""``assert_equivalent``: two LoRAs change the base weights the same way, module by module."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["assert_equivalent", "LoraMismatch"]


class LoraMismatch(AssertionError):
    """Raised by :func:`assert_equivalent`; ``report`` is the :class:`lorafmt.api.DiffReport`."""

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


def _name(x: Any) -> str:
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    source = getattr(getattr(x, "provenance", None), "source", None)
    return source or f"<{type(x).__name__}>"


def assert_equivalent(
    a: Any, b: Any, *, rtol: float = 2e-3, family: str | None = None, max_lines: int = 20
) -> None:
    """Assert that `a` and `b` (paths, PEFT folders, state dicts or :class:`~lorafmt.schema.LoraFile` s, any
    layouts) have the same modules and the same effective ΔW (scale included) within `rtol` per module
    (``‖ΔW_a − ΔW_b‖ / max(‖ΔW_a‖, ‖ΔW_b‖)``), and the same DoRA magnitudes.

    Raises:
        LoraMismatch: an ``AssertionError`` listing each differing module: missing on one side, different shape,
        or the relative error and both norms.

    Example:
        >>> from lorafmt.testing import assert_equivalent, make_lora
        >>> a = make_lora("sd1", modules=2, alpha=4.0)
        >>> b = a.model_copy(deep=True)
        >>> b.modules[next(iter(b.modules))].alpha = 2.0
        >>> try:
        ...     assert_equivalent(a, b)
        ... except AssertionError as e:
        ...     print(str(e).splitlines()[0])
        LoRAs differ in 1 of 2 modules (rtol 0.002): <LoraFile> vs <LoraFile>
    """
    from lorafmt.api import diff

    report = diff(a, b, family=family, rtol=rtol)
    if report.same:
        return
    bad = report.differing
    lines = [f"LoRAs differ in {len(bad)} of {len(report.modules)} modules (rtol {rtol:g}): {_name(a)} vs {_name(b)}"]
    for m in bad[:max_lines]:
        if m.status == "only_a":
            lines.append(f"  only in a   {m.module}")
        elif m.status == "only_b":
            lines.append(f"  only in b   {m.module}")
        elif m.status == "shape":
            lines.append(f"  shape       {m.module}: the ΔW shapes differ")
        else:
            err = "inf" if m.rel_error is None else f"{m.rel_error:.3g}"
            lines.append(f"  differs     {m.module}: rel_error {err} (|ΔW| a {m.norm_a:.4g}, b {m.norm_b:.4g})")
    if len(bad) > max_lines:
        lines.append(f"  ... and {len(bad) - max_lines} more")
    raise LoraMismatch("\n".join(lines), report)
