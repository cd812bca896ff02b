"""Numeric verification of conversions: the written file must reproduce the source's weight changes.

``convert`` verifies by default whenever writing does tensor math — a tensor that is not streamed byte for
byte from its source (split or joined projections, folded alpha, recomputed factors; alpha scalars aside) or
a dtype change. The output is written to its temporary name, read back with the target layout, and each
module's ΔW is compared with the source's; a module that differs beyond what the written dtype can hold
raises :class:`~lorafmt.errors.VerificationError` naming it, and the temporary output is removed (nothing is
renamed into place, an existing destination is untouched).

Tolerances are relative Frobenius errors per module, from the lowest-precision float dtype among the
module's written tensors: two rounded factors multiply their rounding errors, so a few units of that dtype's
epsilon (F32 2e-5, F16 2e-3, BF16 1.6e-2, FP8 0.13). A wrong mapping, a transposed or swapped block or a
lost scale gives errors of order 1.

Example:
    >>> import lorafmt
    >>> r = lorafmt.convert("kohya.safetensors", "out.safetensors", to="diffusers", dtype="fp16")  # doctest: +SKIP
    >>> r.verified  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from lorafmt.dtypes import FLOAT_DTYPES
from lorafmt.errors import LorafmtError, VerificationError
from lorafmt._record import Factory
from lorafmt.schema import ConversionReport, LoraFile, Module, SchemaModel

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["TOLERANCES", "needs_verification", "verify_modules", "verify_output", "make_check", "VerifyReport"]

TOLERANCES = {"F64": 1e-9, "F32": 2e-5, "F16": 2e-3, "BF16": 1.6e-2, "F8_E4M3": 0.13, "F8_E5M2": 0.26}
_ORDER = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]


class VerifyReport(SchemaModel):
    """Per-module relative errors of a verification (worst first) and the modules checked."""

    modules: int = 0
    worst: list[tuple[str, float, float]] = Factory(list)
    """(module, rel error, tolerance)"""
    skipped: list[str] = Factory(list)


def needs_verification(files: dict, dtype: str | None) -> bool:
    """True when writing these planned tensors does tensor math (beyond alpha scalars) or changes a dtype.

    `files` is a write plan's ``{rel path: PlannedFile}``.
    """
    for planned in files.values():
        for ref in planned.tensors.values():
            if ref.shape == () or ref.numel == 1:
                continue  # alpha scalars are always re-encoded
            if not ref.streamable:
                return True
            if dtype and ref.dtype in FLOAT_DTYPES and ref.dtype != dtype:
                return True
    return False


def tolerance(module: Module) -> float:
    """The relative error a module written with these tensors' dtypes may show."""
    dtypes = [ref.dtype for ref in module.all_tensors().values() if ref.dtype in TOLERANCES]
    if not dtypes:
        return TOLERANCES["F32"]
    return TOLERANCES[max(dtypes, key=_ORDER.index)]


def _raw_distance(a: Module, b: Module) -> float | None:
    """Relative error over the algorithms' own tensors (for algorithms whose ΔW needs the base weight)."""
    import numpy as np

    if set(a.tensors) != set(b.tensors) or a.algorithm != b.algorithm:
        return None
    num = den = 0.0
    for role in a.tensors:
        x, y = a.tensors[role].float32().reshape(-1), b.tensors[role].float32().reshape(-1)
        if x.size != y.size:
            return None
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        num += float(np.sum((x64 - y64) ** 2))
        den = max(den, float(np.sum(x64**2)), float(np.sum(y64**2)))
    sa, sb = a.scale, b.scale
    scale_err = abs(sa - sb) / max(abs(sa), abs(sb), 1e-30)
    return max(math.sqrt(num) / max(math.sqrt(den), 1e-30), scale_err)


def _module_error(src: Module, out: Module) -> float | None:
    from lorafmt.api import _delta_distance

    try:
        measured = _delta_distance(src, out)
    except (LorafmtError, NotImplementedError):
        return _raw_distance(src, out)
    if measured is None:
        return None
    return measured[2]


def verify_modules(source: LoraFile, result: LoraFile, *, skip: set[str] | None = None, file: str | None = None) -> VerifyReport:
    """Compare every module of `source` with `result` (ΔW, DoRA magnitude); raise on the first that differs.

    Raises:
        VerificationError: a module is missing, changed shape, or differs beyond its dtype's tolerance.
    """
    skip = skip or set()
    report = VerifyReport()
    errors: list[tuple[str, float, float]] = []
    for path, src in source.modules.items():
        out = result.modules.get(path)
        if out is None:
            if path in skip:
                report.skipped.append(path)
                continue
            msg = "module is missing from the written output"
            raise VerificationError(msg, file=file, module=path)
        tol = max(tolerance(out), tolerance(src))
        err = _module_error(src, out)
        if err is None:
            msg = "the written module's weight change has a different shape than the source's"
            raise VerificationError(msg, file=file, module=path)
        if not err <= tol:  # NaN-safe
            msg = f"written weight change differs from the source by {err:.3g} (relative; tolerance {tol:g})"
            raise VerificationError(msg, file=file, module=path, hint="this is a bug in the conversion; pass --no-verify to write anyway")
        if (src.dora_scale is None) != (out.dora_scale is None):
            msg = "DoRA magnitude was " + ("lost" if out.dora_scale is None else "added")
            raise VerificationError(msg, file=file, module=path)
        if src.dora_scale is not None:
            import numpy as np

            a = src.dora_scale.float32().reshape(-1).astype(np.float64)
            b = out.dora_scale.float32().reshape(-1).astype(np.float64)
            if a.size != b.size or not np.allclose(a, b, rtol=tol, atol=0):
                msg = "written DoRA magnitude differs from the source"
                raise VerificationError(msg, file=file, module=path)
        errors.append((path, err, tol))
        report.modules += 1
    errors.sort(key=lambda t: -t[1])
    report.worst = errors[:5]
    return report


def verify_output(
    source: LoraFile, written: str | os.PathLike, *, layout: str, family: str | None = None, skip: set[str] | None = None
) -> VerifyReport:
    """Read `written` back as `layout` and compare it with `source` module by module.

    Example:
        >>> from lorafmt.verify import verify_output
        >>> verify_output(lorafmt.read("a.safetensors"), "b.safetensors", layout="diffusers").modules  # doctest: +SKIP
        128
    """
    from lorafmt.api import read

    result = read(written, layout=layout, family=family)
    return verify_modules(source, result, skip=skip, file=str(written))


def make_check(lora: LoraFile, *, layout: str, family: str | None, report: ConversionReport) -> Callable[[Path], None]:
    """The callback :func:`lorafmt.api.write` runs on the temporary output before renaming it into place."""

    def check(tmp: Path) -> None:
        skip = {n.module for n in report.notes if n.module}
        verify_output(lora, tmp, layout=layout, family=family, skip=skip)
        report.verified = True

    return check
