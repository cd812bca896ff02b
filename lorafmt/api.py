"""The public verbs: read, detect, write, convert, diff, inspect. No format knowledge lives here."""

from __future__ import annotations

import functools
import gc
import math
import os
from collections import Counter
from collections.abc import Callable

from lorafmt.algorithms import get_algorithm
from lorafmt.detect import pick_layout
from lorafmt.dtypes import CLI_DTYPES, FLOAT_DTYPES, from_float32
from lorafmt.errors import (
    STRUCTURAL_ERRORS,
    LayoutError,
    LossyConversionError,
    OutputExistsError,
    SourceError,
    UnplacedKeysError,
    UnsupportedFeatureError,
)
from lorafmt.io.atomic import atomic_directory, atomic_output
from lorafmt.io.safetensors_io import WriteEntry, write_safetensors
from lorafmt.io.source import open_source
from lorafmt.layouts import get_layout
from lorafmt.layouts._base import WriteOptions, WritePlan
from lorafmt._record import Factory
from lorafmt.schema import ConversionReport, Detection, Diagnostic, LoraFile, SchemaModel, TensorRef

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:  # numpy is imported on first use: header-only commands never load it
    from typing import Any
    import numpy as np

__all__ = ["read", "detect", "write", "convert", "diff", "inspect", "DiffReport", "ModuleDiff"]


def _gc_paused(fn):
    """Run `fn` with the cyclic garbage collector paused.

    Reading a header builds thousands of small, acyclic objects (a few per tensor), and the collector would
    rescan them dozens of times on the way (milliseconds per command); reference counting frees them all the
    same, and the collector resumes as soon as `fn` returns.
    """

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return paused


@_gc_paused
def detect(src: str | os.PathLike | Any, *, allow_pickle: bool | None = None) -> Detection:
    """Detect a file's layout and family from its header alone.

    Example:
        >>> d = lorafmt.detect("my_lora.safetensors")  # doctest: +SKIP
        >>> d.layout, d.family  # doctest: +SKIP
        ('kohya', 'sdxl')
    """
    source = open_source(src, allow_pickle=allow_pickle, header_only=True)
    best, matches = pick_layout(source)
    lora = get_layout(best.layout).read(source)
    return Detection(
        layout=best.layout,
        score=best.score,
        evidence=best.evidence,
        family=lora.family,
        family_evidence=lora.provenance.evidence,
        candidates={m.layout: m.score for m in matches},
    )


@_gc_paused
def read(
    src: str | os.PathLike | Any,
    *,
    layout: str | None = None,
    family: str | None = None,
    metadata: dict[str, str] | None = None,
    allow_pickle: bool | None = None,
) -> LoraFile:
    """Read a LoRA (path to a file or PEFT folder, or a ``{key: tensor}`` dict) into canonical form.

    Only headers are read (plus alpha scalars); tensors stay lazy. Pickle/zip checkpoints (.ckpt/.pt/.bin) are
    refused unless ``allow_pickle=True``, and then load only through ``torch.load(weights_only=True)``.

    Example:
        >>> lora = lorafmt.read("my_lora.safetensors")  # doctest: +SKIP
        >>> lora.family, len(lora.modules)  # doctest: +SKIP
    """
    source = open_source(src, metadata=metadata, allow_pickle=allow_pickle)
    if layout is None:
        best, _ = pick_layout(source)
        layout = best.layout
        evidence = best.evidence
    else:
        evidence = ["layout given"]
    lay = get_layout(layout)
    lora = lay.read(source, family=family)
    lora.provenance.layout = lay.name
    lora.provenance.evidence = [*evidence, *lora.provenance.evidence]
    return lora


# ------------------------------------------------------------------------------------------- writing


def _check_expressible(
    lora: LoraFile, layout_name: str, allow_lossy: bool, approx_rank: int | None = None, dtype: str | None = None
) -> tuple[LoraFile, list[Diagnostic]]:
    """Refuse (or, when lossy is allowed, drop or approximate) what `layout_name` cannot express.

    With ``allow_lossy`` and ``approx_rank``, modules refused for their algorithm (LoHa/LoKr/full/Tucker/...)
    are replaced by a rank-``approx_rank`` LoRA from the truncated SVD of their ΔW; each gets a ``W003`` note
    whose ``data`` holds ``rel_error`` (‖ΔW − ΔW_R‖ / ‖ΔW‖ of the stored factors), ``rank`` and ``from_algorithm``.
    """
    lay = get_layout(layout_name)
    caps = lay.capabilities
    if not caps.writable:
        msg = f"layout {layout_name!r} is read-only"
        raise UnsupportedFeatureError(msg)
    notes: list[Diagnostic] = []
    if not caps.tucker and "lora" in caps.algorithms:
        lora, notes = _fold_tucker(lora)
    problems, algorithmic = _expressibility_problems(lora, layout_name)
    if not problems:
        return lora, notes
    if not allow_lossy:
        first = sorted(problems)[:5]
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        msg = f"{len(problems)} modules cannot be written as {layout_name}: " + "; ".join(f"{p}: {problems[p]}" for p in first) + more
        hint = "pass --allow-lossy to drop them (each is reported)"
        if algorithmic:
            hint = "pass --allow-lossy --approx-rank R to approximate them as rank-R LoRA (each error is reported), or --allow-lossy to drop them"
        raise LossyConversionError(msg, module=first[0], hint=hint)
    modules = dict(lora.modules)
    if approx_rank is not None:
        from lorafmt.algorithms.svd import approximate_as_lora

        for path in sorted(algorithmic):
            old = modules[path]
            try:
                new, err = approximate_as_lora(old, approx_rank, dtype=dtype)
            except UnsupportedFeatureError as exc:
                notes.append(Diagnostic(code="W001", severity="warning", message=f"dropped: {problems[path]}; {exc.message}", module=path))
                del modules[path]
                continue
            modules[path] = new
            notes.append(
                Diagnostic(
                    code="W003",
                    severity="warning",
                    message=f"approximated {old.algorithm} as rank-{new.rank} LoRA (relative error {err:.3g}): {problems[path]}",
                    module=path,
                    data={"rel_error": err, "rank": new.rank, "from_algorithm": old.algorithm},
                )
            )
        lora = lora.model_copy(update={"modules": modules})
        problems, _ = _expressibility_problems(lora, layout_name)
    kept = {p: m for p, m in lora.modules.items() if p not in problems}
    for path, why in sorted(problems.items()):
        notes.append(Diagnostic(code="W001", severity="warning", message=f"dropped: {why}", module=path))
    return lora.model_copy(update={"modules": kept}), notes


def _fold_tucker(lora: LoraFile) -> tuple[LoraFile, list[Diagnostic]]:
    """Tucker LoCon (``lora_mid``) rewritten exactly as a k×k ``down`` for layouts without Tucker (I001 notes)."""
    tucker = [p for p, m in lora.modules.items() if m.algorithm == "lora" and "mid" in m.tensors]
    if not tucker:
        return lora, []
    from lorafmt.algorithms.svd import fold_tucker

    modules = dict(lora.modules)
    notes = []
    for path in tucker:
        modules[path] = fold_tucker(modules[path])
        notes.append(
            Diagnostic(code="I001", severity="info", message="Tucker lora_mid folded into a k×k down factor (exact, computed in float32)", module=path)
        )
    return lora.model_copy(update={"modules": modules}), notes


def _expressibility_problems(lora: LoraFile, layout_name: str) -> tuple[dict[str, str], set[str]]:
    """(module -> why it cannot be written, the modules refused for their algorithm, i.e. approximable)."""
    lay = get_layout(layout_name)
    caps = lay.capabilities
    problems: dict[str, str] = {}
    algorithmic: set[str] = set()
    for path, m in lora.modules.items():
        if m.mode == "set":
            if not caps.set_tensors:
                problems[path] = f"a `set` (replacement) tensor is not expressible in {layout_name}"
            elif m.component not in caps.components:
                problems[path] = f"component {m.component!r} is not expressible in {layout_name}"
            continue
        if m.algorithm not in caps.algorithms:
            problems[path] = f"algorithm {m.algorithm!r} is not expressible in {layout_name}"
            algorithmic.add(path)
        elif "mid" in m.tensors and not caps.tucker:
            problems[path] = f"Tucker (lora_mid) factors are not expressible in {layout_name}"
            algorithmic.add(path)
        elif m.dora_scale is not None and m.dora_axis not in caps.dora_axes:
            problems[path] = f"DoRA magnitude on the {m.dora_axis} axis is not expressible in {layout_name}"
            if m.dora_axis == "in":
                problems[path] += " (it normalises per input column; PEFT/diffusers normalise per output row)"
        elif "bias" in m.tensors and not caps.lora_bias:
            problems[path] = f"LoRA bias (lora_B.bias) is not expressible in {layout_name}"
        elif m.component not in caps.components:
            problems[path] = f"component {m.component!r} is not expressible in {layout_name}"
    # layout-specific rules (e.g. PEFT: one adapter type per component, LoKr factor shapes its config can rebuild)
    refusals = getattr(lay, "refusals", None)
    if refusals is not None:
        for path, why in refusals({p: m for p, m in lora.modules.items() if p not in problems}).items():
            problems[path] = why
            algorithmic.add(path)
    return problems, algorithmic


def _entry(key: str, ref: TensorRef, dtype: str | None) -> tuple[WriteEntry, bool]:
    """A write entry for `ref`; True when its bytes are streamed from the source file untouched."""
    target = dtype if (dtype and ref.dtype in FLOAT_DTYPES and ref.shape != ()) else ref.dtype
    if target == ref.dtype and ref.streamable:
        return WriteEntry(key, ref.dtype, tuple(ref.shape), src_path=ref.file, src_offset=ref.offset, nbytes=ref.nbytes), True
    if target == ref.dtype:
        return WriteEntry(key, ref.dtype, tuple(ref.shape), data=ref.tobytes()), False
    return WriteEntry(key, target, tuple(ref.shape), data=from_float32(ref.float32(), target).tobytes()), False


def _execute(
    plan: WritePlan,
    dst: str,
    dtype: str | None,
    force: bool,
    report: ConversionReport,
    check: Callable[[Any], None] | None = None,
    stale_hashes: dict[str, str] | None = None,
) -> None:
    """Write `plan` atomically; `check(tmp)` (verification) runs on the finished temporary output before the rename.

    `stale_hashes` (hash keys the source carried) get values for the new file, computed from the planned bytes
    so the output is written once.
    """
    def entries_for(tensors: dict[str, TensorRef]) -> list[WriteEntry]:
        out = []
        for key, ref in tensors.items():
            entry, streamed = _entry(key, ref, dtype)
            out.append(entry)
            if streamed:
                report.bytes_streamed += entry.size
            else:
                report.bytes_computed += entry.size
        report.tensors_written += len(out)
        return out

    if not plan.directory:
        planned = plan.files[""]
        entries = entries_for(planned.tensors)
        metadata = planned.metadata
        if stale_hashes:
            from lorafmt.metadata import fresh_hashes

            metadata = {**metadata, **fresh_hashes(entries, metadata, stale_hashes)}
        if check is None:
            write_safetensors(dst, entries, metadata, force=force)
            return
        with atomic_output(dst, force=force) as tmp:  # flushes (or not) as a whole, after the check
            write_safetensors(tmp, entries, metadata, force=True, durable=False)
            check(tmp)
        return
    with atomic_directory(dst, force=force) as tmp:
        for rel, planned in sorted(plan.files.items()):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(target, entries_for(planned.tensors), planned.metadata, force=True, durable=False)
        for rel, data in sorted(plan.sidecars.items()):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if check is not None:
            check(tmp)


@_gc_paused
def write(
    lora: LoraFile,
    dst: str | os.PathLike,
    *,
    layout: str,
    family: str | None = None,
    dtype: str | None = None,
    allow_lossy: bool = False,
    force: bool = True,
    approx_rank: int | None = None,
    verify: bool | None = None,
) -> ConversionReport:
    """Write a canonical LoRA in `layout` (a file, or a folder for ``peft``), atomically.

    With ``allow_lossy=True, approx_rank=R``, modules the layout cannot express (LoHa, LoKr, full, Tucker, ...)
    are approximated as rank-R LoRA; the report's ``W003`` notes give each module's relative error.

    `verify` (default: whenever the write does tensor math or changes a dtype) reads the temporary output
    back and refuses, with :class:`~lorafmt.errors.VerificationError`, a module whose ΔW differs beyond the
    dtype's tolerance (see :mod:`lorafmt.verify`). Modules dropped by ``allow_lossy`` are not expected in the
    output; approximated ones are checked against their approximation.

    Example:
        >>> lorafmt.write(lora, "out.safetensors", layout="diffusers")  # doctest: +SKIP
        >>> r = lorafmt.write(loha, "out.safetensors", layout="diffusers", allow_lossy=True, approx_rank=16)  # doctest: +SKIP
        >>> [n.data["rel_error"] for n in r.notes if n.code == "W003"]  # doctest: +SKIP
    """
    lay = get_layout(layout)
    dtype = _norm_dtype(dtype)
    lay.check_family(lora, family or lora.family)
    lora, notes = _check_expressible(lora, lay.name, allow_lossy, approx_rank=approx_rank, dtype=dtype)
    lora, stale_hashes = _refresh_metadata(lora, lay.name, family)
    plan = lay.plan(lora, WriteOptions(family=family, allow_lossy=allow_lossy))
    report = ConversionReport(
        source=lora.provenance.source,
        destination=str(dst),
        source_layout=lora.provenance.layout,
        target_layout=lay.name,
        family=family or lora.family,
        modules=len(lora.modules),
        notes=[*notes, *plan.notes],
    )
    check = None
    if verify is not False:
        from lorafmt.verify import make_check, needs_verification

        if verify or needs_verification(plan.files, dtype):
            check = make_check(lora, layout=lay.name, family=family or lora.family, report=report)
    _execute(plan, os.fspath(dst), dtype, force, report, check, stale_hashes)
    return report


# Layouts whose readers use the weights-only hashes (sd-scripts writes them, A1111's networks read them): a
# conversion into one of these recomputes them; other layouts drop them (a stale hash is worse than none, and
# hashing costs as much as copying the bytes again).
_HASHED_LAYOUTS = frozenset({"kohya"})


def _refresh_metadata(lora: LoraFile, layout: str, family: str | None) -> tuple[LoraFile, dict[str, str]]:
    """Rewrite metadata a conversion makes stale (lorafmt.metadata); returns the hash keys to recompute."""
    if not lora.metadata:
        return lora, {}
    from lorafmt.metadata import HASH_KEYS, refresh_metadata

    stale = {k: v for k, v in lora.metadata.items() if k in HASH_KEYS} if layout in _HASHED_LAYOUTS else {}
    fresh = refresh_metadata(lora.metadata, target_layout=layout, family=family or lora.family, modules=lora.modules)
    return lora.model_copy(update={"metadata": fresh}), stale


def _norm_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    key = dtype.lower()
    if key in CLI_DTYPES:
        return CLI_DTYPES[key]
    if dtype.upper() in ("F16", "BF16", "F32"):
        return dtype.upper()
    msg = f"unknown dtype {dtype!r}; use fp16, bf16 or fp32"
    raise SourceError(msg)


@_gc_paused
def convert(
    src: str | os.PathLike | Any,
    dst: str | os.PathLike,
    *,
    to: str,
    family: str | None = None,
    source_layout: str | None = None,
    dtype: str | None = None,
    allow_lossy: bool = False,
    strict: bool = True,
    force: bool = False,
    allow_pickle: bool | None = None,
    approx_rank: int | None = None,
    verify: bool | None = None,
) -> ConversionReport:
    """Convert a LoRA to another layout. Refuses unplaced keys, structural errors and lossy writes by default.

    Example:
        >>> report = lorafmt.convert("kohya.safetensors", "pytorch_lora_weights.safetensors", to="diffusers")  # doctest: +SKIP
        >>> report.modules  # doctest: +SKIP
    """
    if not force and os.path.lexists(dst):
        msg = "output exists; pass --force (force=True) to replace it"
        raise OutputExistsError(msg, file=str(dst))
    lora = read(src, layout=source_layout, family=family, allow_pickle=allow_pickle)
    strict = strict and not allow_lossy
    if strict:
        errors = [d for d in lora.issues if d.severity == "error"]
        if errors:
            first = errors[0]
            msg = f"{len(errors)} structural problem(s): {first.message}"
            cls = STRUCTURAL_ERRORS.get(first.code, LayoutError)
            raise cls(msg, file=lora.provenance.source, key=first.key, module=first.module)
        if lora.unplaced:
            keys = sorted(lora.unplaced)
            more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
            msg = f"{len(keys)} key(s) could not be placed on a module: {', '.join(keys[:3])}{more}"
            raise UnplacedKeysError(msg, file=lora.provenance.source, key=keys[0], hint="inspect the file with `lorafmt inspect`; pass --allow-lossy to drop them")
    notes = []
    if lora.unplaced and not strict:
        for key in sorted(lora.unplaced):
            notes.append(Diagnostic(code="W002", severity="warning", message="dropped unplaced key", key=key))
    report = write(
        lora, dst, layout=to, family=family, dtype=dtype, allow_lossy=allow_lossy or not strict, force=force, approx_rank=approx_rank,
        verify=verify,
    )
    report.notes = [*notes, *report.notes]
    return report


# ------------------------------------------------------------------------------------------- diff


class ModuleDiff(SchemaModel):
    """One module's verdict in a :class:`DiffReport`."""

    module: str
    status: str  # same | differ | only_a | only_b | shape
    rel_error: float | None = None
    norm_a: float | None = None
    norm_b: float | None = None


class DiffReport(SchemaModel):
    """Module-by-module comparison of the effective weight change of two LoRAs."""

    a: str | None
    b: str | None
    rtol: float
    same: bool
    modules: list[ModuleDiff] = Factory(list)

    @property
    def differing(self) -> list[ModuleDiff]:
        return [m for m in self.modules if m.status != "same"]


def module_delta(module) -> np.ndarray:
    """ΔW of one module in float32, scale included (DoRA magnitude not applied: it needs the base weight).

    For algorithms whose effect depends on the base weight (IA3, OFT) the parameters themselves are returned
    (flattened, alpha appended): equal parameters mean an equal effect on any base.
    """
    algo = get_algorithm(module.algorithm)
    if algo.needs_base:
        import numpy as np

        parts = [module.tensors[r].float32().reshape(-1) for r in sorted(module.tensors)]
        parts.append(np.asarray([module.alpha or 0.0], dtype=np.float32))
        return np.concatenate(parts)
    return algo.delta(module)


def _low_rank(module):
    algo = get_algorithm(module.algorithm)
    factors = getattr(algo, "factors", None)
    return factors(module) if factors is not None else None


def _delta_distance(ma, mb) -> tuple[float, float, float] | None:
    """(‖ΔWa‖, ‖ΔWb‖, relative error) without forming ΔW when both are low-rank products.

    For ΔW = U·D the Frobenius inner products reduce to r×r Gram matrices: ⟨UaDa, UbDb⟩ = Σ (UaᵀUb) ∘ (DaDbᵀ).
    """
    import numpy as np

    fa, fb = _low_rank(ma), _low_rank(mb)
    if fa is not None and fb is not None and fa[0].shape[0] == fb[0].shape[0] and fa[1].shape[1] == fb[1].shape[1]:
        (ua, da), (ub, db) = fa, fb
        if ua.shape == ub.shape and da.shape == db.shape and np.array_equal(ua, ub) and np.array_equal(da, db):
            n = float(np.sqrt(np.sum((ua.T @ ua) * (da @ da.T))))
            return n, n, 0.0
        aa = float(np.sum((ua.T @ ua) * (da @ da.T)))
        bb = float(np.sum((ub.T @ ub) * (db @ db.T)))
        ab = float(np.sum((ua.T @ ub) * (da @ db.T)))
        na, nb = math.sqrt(max(aa, 0.0)), math.sqrt(max(bb, 0.0))
        dist = math.sqrt(max(aa + bb - 2 * ab, 0.0))
        scale = max(na, nb)
        if scale == 0.0:
            return na, nb, 0.0
        # Cancellation floor: below ~1e-7 relative the Gram form cannot resolve the difference; check exactly.
        if dist / scale < 1e-6:
            dense = float(np.linalg.norm(ua @ da - ub @ db))
            return na, nb, dense / scale
        return na, nb, dist / scale
    da_, db_ = module_delta(ma), module_delta(mb)
    if da_.size != db_.size:
        return None
    da_, db_ = da_.reshape(-1).astype(np.float64), db_.reshape(-1).astype(np.float64)
    na, nb = float(np.linalg.norm(da_)), float(np.linalg.norm(db_))
    err = float(np.linalg.norm(da_ - db_)) / max(na, nb, 1e-30)
    if not math.isfinite(err):
        err = 0.0 if np.array_equal(da_, db_, equal_nan=True) else math.inf
    return na, nb, err


def diff(
    a: str | os.PathLike | LoraFile | Any,
    b: str | os.PathLike | LoraFile | Any,
    *,
    family: str | None = None,
    rtol: float = 2e-3,
    allow_pickle: bool | None = None,
) -> DiffReport:
    """Compare the effective ΔW of two LoRAs module by module (any layouts).

    Example:
        >>> lorafmt.diff("kohya.safetensors", "diffusers.safetensors").same  # doctest: +SKIP
        True
    """
    import numpy as np

    la = a if isinstance(a, LoraFile) else read(a, family=family, allow_pickle=allow_pickle)
    lb = b if isinstance(b, LoraFile) else read(b, family=family, allow_pickle=allow_pickle)
    out: list[ModuleDiff] = []
    for path in sorted(set(la.modules) | set(lb.modules)):
        ma, mb = la.modules.get(path), lb.modules.get(path)
        if ma is None:
            out.append(ModuleDiff(module=path, status="only_b"))
            continue
        if mb is None:
            out.append(ModuleDiff(module=path, status="only_a"))
            continue
        measured = _delta_distance(ma, mb)
        if measured is None:
            out.append(ModuleDiff(module=path, status="shape"))
            continue
        na, nb, err = measured
        same = err <= rtol
        if same and (ma.dora_scale is None) != (mb.dora_scale is None):
            same = False
        if same and ma.dora_scale is not None and mb.dora_scale is not None:
            same = np.allclose(ma.dora_scale.float32().reshape(-1), mb.dora_scale.float32().reshape(-1), rtol=rtol, atol=0)
        out.append(ModuleDiff(module=path, status="same" if same else "differ", rel_error=err, norm_a=na, norm_b=nb))
    return DiffReport(a=la.provenance.source, b=lb.provenance.source, rtol=rtol, same=all(m.status == "same" for m in out), modules=out)


# ------------------------------------------------------------------------------------------- inspect


@_gc_paused
def inspect(
    src: str | os.PathLike | Any, *, layout: str | None = None, family: str | None = None, allow_pickle: bool | None = None
) -> dict[str, Any]:
    """A JSON-ready summary of a LoRA: layout, family, algorithms, components, ranks, alphas, dtypes, DoRA, metadata.

    Header only (alpha scalars aside); never imports torch.

    Example:
        >>> lorafmt.inspect("my_lora.safetensors")["family"]  # doctest: +SKIP
        'sdxl'
    """
    lora = read(open_source(src, allow_pickle=allow_pickle, header_only=True), layout=layout, family=family)
    ranks: Counter[int] = Counter()
    alphas: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    for m in lora.modules.values():
        if m.rank is not None:
            ranks[m.rank] += 1
        alphas["none" if m.alpha is None else _num(m.alpha)] += 1
        for ref in m.all_tensors().values():
            dtypes[ref.dtype] += 1
    for ref in lora.unplaced.values():
        dtypes[ref.dtype] += 1
    return {
        "path": lora.provenance.source,
        "layout": lora.provenance.layout,
        "layout_evidence": lora.provenance.evidence,
        "family": lora.family,
        "algorithms": lora.algorithms,
        "components": lora.components,
        "modules": len(lora.modules),
        "tensors": lora.tensor_count(),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": dict(sorted(alphas.items())),
        "dtypes": dict(sorted(dtypes.items())),
        "dora": lora.has_dora,
        "metadata": lora.metadata,
        "unplaced_keys": sorted(lora.unplaced),
        "issues": [d.model_dump() for d in lora.issues],
    }


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
