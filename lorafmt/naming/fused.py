"""Exact splitting and joining of modules on fused projections (Flux ``qkv``/``linear1``, SD3 ``attn.qkv``).

A fused Linear ``W = [W_0; W_1; …]`` (rows stacked) carries one LoRA ``ΔW = s · up @ down``. Its parts are

* **split** (:func:`split_module`): part *i* gets the rows of ``up`` for its slice and the *shared* ``down``;
  nothing is computed — row slices of a row-major tensor are contiguous bytes, so a file-backed ``up`` stays a
  lazy byte range and conversion still streams. When ``up`` is block-diagonal with ``rank % n == 0`` (what
  kohya ``split_qkv`` saves), ``down`` is chunked by rank and only the diagonal blocks of ``up`` are kept; the
  file's alpha was kept at rank ``n·r`` (kohya's alpha quirk), so each part gets ``alpha / n`` and the scale,
  hence ΔW, is unchanged.
* **joined** (:func:`join_modules`): when every part shares the same ``down`` (same bytes) and scale, ``up`` rows
  are concatenated and the rank stays; otherwise ``down`` s are stacked (rank grows to ``Σ r_i``) and ``up``
  becomes block-diagonal. Parts with different scales get their scale ratio folded into their ``up`` block
  (exact for powers of two; otherwise the joined ``up`` is written in F32 so the fold does not round). Missing
  parts contribute zero rows.

Every tensor keeps its dtype; rows are sliced and stacked as raw bytes (bf16/fp16 bit-exact). ``full`` splits like
``up`` (rows of ``diff``); LoKr (ΔW = kron(w1, w2)) splits exactly when the parts fall on whole rows of ``w1``
(part sizes divisible by ``w2``'s rows: the common 9216 = 96·96 qkv factorisation does), slicing ``w1`` and sharing
``w2``. Other algorithms (LoHa, Tucker, OFT…) on a fused projection are reported, never silently dropped.

Example:
    >>> import numpy as np
    >>> from lorafmt.schema import Module, TensorRef
    >>> up = TensorRef.from_array("up", np.arange(12, dtype=np.float32).reshape(6, 2))
    >>> down = TensorRef.from_array("down", np.ones((2, 4), dtype=np.float32))
    >>> fused = Module(path="t.qkv", tensors={"up": up, "down": down}, alpha=2.0)
    >>> parts = split_module(fused, ["t.q", "t.k", "t.v"], [2, 2, 2])
    >>> [p.tensors["up"].shape for p in parts], parts[0].tensors["down"] is down
    ([(2, 2), (2, 2), (2, 2)], True)
    >>> joined, notes = join_modules("t.qkv", parts, [2, 2, 2])
    >>> joined.rank, joined.alpha, np.array_equal(joined.tensors["up"].float32(), up.float32())
    (2, 2.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from lorafmt.dtypes import DTYPE_SIZES, from_float32, numpy_dtype, to_float32
from lorafmt.schema import Diagnostic, Module, TensorRef

class _LazyNumpy:
    """numpy, imported on first use: header-only commands (inspect, detect) never load it."""

    def __getattr__(self, name: str):
        import numpy

        return getattr(numpy, name)


np = _LazyNumpy()

__all__ = [
    "row_slice",
    "concat_rows",
    "swap_halves",
    "split_module",
    "join_modules",
    "swap_module",
    "is_block_diagonal",
    "SPLITTABLE",
    "FusedError",
    "scaled",
    "alpha_dtype_for",
]

# Algorithms whose ΔW rows can be sliced/stacked exactly, with the roles that carry output rows.
SPLITTABLE = {"lora": ("up", "bias"), "full": ("diff", "diff_b")}


class FusedError(ValueError):
    """A module cannot be split or joined exactly (the caller turns this into a diagnostic or a refusal)."""


# ------------------------------------------------------------------------------------------ tensor helpers


def row_slice(ref: TensorRef, start: int, stop: int) -> TensorRef:
    """Rows ``start:stop`` of `ref` (axis 0), without reading data when the bytes live in a file."""
    shape = (stop - start, *ref.shape[1:])
    key = f"{ref.key}[{start}:{stop}]"
    if start == 0 and stop == ref.shape[0]:
        return ref
    if ref.streamable:
        row_bytes = math.prod(ref.shape[1:]) * DTYPE_SIZES[ref.dtype]
        return ref.model_copy(update={"key": key, "shape": shape, "offset": ref.offset + start * row_bytes})
    return TensorRef.from_raw(key, ref.dtype, np.ascontiguousarray(ref.raw()[start:stop]))


def _common_dtype(refs: Sequence[TensorRef]) -> str:
    dtypes = {r.dtype for r in refs}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


def _raw_as(ref: TensorRef, dtype: str) -> np.ndarray:
    if ref.dtype == dtype:
        return ref.raw()
    return from_float32(ref.float32(), dtype)


def concat_rows(refs: Sequence[TensorRef], key: str) -> TensorRef:
    """Stack tensors along axis 0, bit-exact; adjacent byte ranges of one file stay a lazy range."""
    refs = list(refs)
    if len(refs) == 1:
        return refs[0].renamed(key)
    first = refs[0]
    if all(r.streamable for r in refs) and len({(r.file, r.dtype, r.shape[1:]) for r in refs}) == 1:
        pos = first.offset
        for r in refs:
            if r.offset != pos:
                break
            pos += r.nbytes
        else:
            shape = (sum(r.shape[0] for r in refs), *first.shape[1:])
            return first.model_copy(update={"key": key, "shape": shape})
    dtype = _common_dtype(refs)
    raw = np.concatenate([_raw_as(r, dtype) for r in refs], axis=0)
    return TensorRef.from_raw(key, dtype, raw)


def swap_halves(ref: TensorRef) -> TensorRef:
    """Exchange the two halves of axis 0 (BFL ``shift|scale`` <-> diffusers ``scale|shift``), bit-exact."""
    half = ref.shape[0] // 2
    if ref.shape[0] != 2 * half:
        msg = f"cannot swap halves of {ref.key}: {ref.shape[0]} rows is odd"
        raise FusedError(msg)
    raw = ref.raw()
    out = np.concatenate([raw[half:], raw[:half]], axis=0)
    return TensorRef.from_raw(f"{ref.key}[swapped]", ref.dtype, out)


def _same_values(a: TensorRef, b: TensorRef) -> bool:
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    if a.streamable and b.streamable and (a.file, a.offset, a.dtype) == (b.file, b.offset, b.dtype):
        return True
    if a.dtype == b.dtype:
        return bool(np.array_equal(a.raw(), b.raw()))
    return bool(np.array_equal(a.float32(), b.float32()))


def _matrix(ref: TensorRef) -> tuple[int, int]:
    return ref.shape[0], math.prod(ref.shape[1:])


def is_block_diagonal(up: TensorRef, sizes: Sequence[int]) -> bool:
    """True when ``up`` (rows split by `sizes`, columns split in ``len(sizes)`` equal chunks) is block-diagonal."""
    n = len(sizes)
    rows, rank = _matrix(up)
    if n < 2 or rank % n:
        return False
    r = rank // n
    mat = up.float32().reshape(rows, rank)
    start = 0
    for i, size in enumerate(sizes):
        block = mat[start : start + size]
        off = np.concatenate([block[:, : i * r], block[:, (i + 1) * r :]], axis=1)
        if off.size and np.any(off != 0):
            return False
        start += size
    return True


# ------------------------------------------------------------------------------------------ split


def split_module(
    module: Module,
    paths: Sequence[str],
    sizes: Sequence[int],
    *,
    detect_block_diagonal: bool = False,
) -> list[Module]:
    """Split a module on a fused weight into one module per part (`paths`, output rows `sizes`).

    Raises :class:`FusedError` when the algorithm's ΔW cannot be sliced by rows (LoHa, LoKr, …) or the
    module's DoRA magnitude is per input column (its norm spans every part).
    """
    if module.dora_scale is not None and module.dora_axis != "out":
        msg = "a DoRA magnitude per input column on a fused projection cannot be split exactly"
        raise FusedError(msg)
    if module.algorithm == "lokr":
        return _split_lokr(module, paths, sizes, drop_zero=detect_block_diagonal)
    row_roles = SPLITTABLE.get(module.algorithm)
    if row_roles is None:
        msg = f"algorithm {module.algorithm!r} on a fused projection cannot be split exactly"
        raise FusedError(msg)
    if module.algorithm == "lora" and "mid" in module.tensors:
        msg = "a Tucker (lora_mid) factor on a fused projection cannot be split exactly"
        raise FusedError(msg)
    lead = module.tensors[row_roles[0]]
    if sum(sizes) != lead.shape[0]:
        msg = f"{module.path}: {lead.shape[0]} output rows do not split into {list(sizes)}"
        raise FusedError(msg)
    if module.algorithm == "lora" and detect_block_diagonal and len(paths) > 1:
        compact = _split_by_support(module, paths, sizes)
        if compact is not None:
            return compact
    if module.algorithm == "full" and detect_block_diagonal and module.dora_scale is None:
        parts = split_module(module, paths, sizes)
        kept = [p for p in parts if any(np.any(ref.float32() != 0) for ref in p.tensors.values())]
        return kept or parts  # absent parts of a join are zero rows; an all-zero module keeps every part
    out = []
    start = 0
    for path, size in zip(paths, sizes):
        tensors = dict(module.tensors)
        for role in row_roles:
            if role in tensors:
                tensors[role] = row_slice(tensors[role], start, start + size)
        dora = row_slice(module.dora_scale, start, start + size) if module.dora_scale is not None else None
        out.append(
            Module(
                path=path,
                algorithm=module.algorithm,
                tensors=tensors,
                alpha=module.alpha,
                alpha_dtype=module.alpha_dtype,
                dora_scale=dora,
                dora_axis=module.dora_axis,
                extras=dict(module.extras),
            )
        )
        start += size
    return out


def _lokr_factor_rows(module: Module) -> tuple[str, int, int]:
    """(role holding w1's rows, rows of w1, rows of w2) of a LoKr module: ΔW = kron(w1, w2), so ΔW row
    ``i1·b + i2`` is w1 row i1 with w2 row i2."""
    t = module.tensors
    if "t2" in t:
        msg = f"{module.path}: a Tucker LoKr (lokr_t2) on a fused projection cannot be split exactly"
        raise FusedError(msg)
    w1_role = "w1" if "w1" in t else "w1_a"
    if w1_role not in t or not ("w2" in t or "w2_a" in t):
        msg = f"{module.path}: incomplete LoKr factors {sorted(t)}"
        raise FusedError(msg)
    b = t["w2"].shape[0] if "w2" in t else t["w2_a"].shape[0]
    return w1_role, t[w1_role].shape[0], b


def _split_lokr(module: Module, paths: Sequence[str], sizes: Sequence[int], *, drop_zero: bool = False) -> list[Module]:
    """Rows of kron(w1, w2) in blocks of w2's row count come from one w1 row each: a split on those boundaries
    slices w1 (or w1_a) by rows and shares everything else — exact, no data read. With `drop_zero`, parts whose
    w1 rows are all zero (absent when joined) are left out, as for LoRA."""
    w1_role, a, b = _lokr_factor_rows(module)
    if sum(sizes) != a * b:
        msg = f"{module.path}: {a * b} output rows do not split into {list(sizes)}"
        raise FusedError(msg)
    if any(size % b for size in sizes):
        msg = f"{module.path}: LoKr w2 has {b} rows; the parts {list(sizes)} do not fall on w1 rows"
        raise FusedError(msg)
    out = []
    start = 0
    for path, size in zip(paths, sizes):
        tensors = dict(module.tensors)
        tensors[w1_role] = row_slice(tensors[w1_role], start // b, (start + size) // b)
        dora = row_slice(module.dora_scale, start, start + size) if module.dora_scale is not None else None
        start += size
        if drop_zero and dora is None and not np.any(tensors[w1_role].float32() != 0):
            continue
        out.append(module.model_copy(update={"path": path, "tensors": tensors, "dora_scale": dora}))
    if not out:  # all zero: keep every part rather than lose the module
        return _split_lokr(module, paths, sizes)
    return out


def _join_lokr(path: str, parts: Sequence[Module | None], sizes: Sequence[int]) -> Module:
    present = [m for m in parts if m is not None]
    first = present[0]
    w1_role, _, b = _lokr_factor_rows(first)
    shared_roles = sorted(set(first.tensors) - {w1_role})
    for m in present[1:]:
        if set(m.tensors) != set(first.tensors) or m.scale != first.scale:
            msg = f"{path}: LoKr parts with different factor sets or scales cannot be joined exactly"
            raise FusedError(msg)
        if not all(_same_values(m.tensors[r], first.tensors[r]) for r in shared_roles):
            msg = f"{path}: LoKr parts do not share w2 (and w1_b); their Kronecker products cannot be joined"
            raise FusedError(msg)
    if any(size % b for size in sizes):
        msg = f"{path}: LoKr w2 has {b} rows; the parts {list(sizes)} do not fall on w1 rows"
        raise FusedError(msg)
    ref0 = first.tensors[w1_role]
    chunks = []
    for m, size in zip(parts, sizes):
        if m is None:
            zeros = np.zeros((size // b, *ref0.shape[1:]), dtype=numpy_dtype(ref0.dtype))
            chunks.append(TensorRef.from_raw(f"{path}.{w1_role}[zeros]", ref0.dtype, zeros))
        else:
            chunks.append(m.tensors[w1_role])
    tensors = dict(first.tensors)
    tensors[w1_role] = concat_rows(chunks, f"{path}.{w1_role}")
    dora = None
    if first.dora_scale is not None:
        dora = concat_rows([m.dora_scale for m in present], f"{path}.dora_scale")
    return first.model_copy(update={"path": path, "tensors": tensors, "dora_scale": dora})


def _support(up: TensorRef, sizes: Sequence[int]) -> list[np.ndarray]:
    """Per part (row range), the boolean mask of rank columns its rows of ``up`` use."""
    mat = up.float32().reshape(up.shape[0], -1)
    masks = []
    start = 0
    for size in sizes:
        masks.append(np.any(mat[start : start + size] != 0, axis=0))
        start += size
    return masks


def _split_by_support(module: Module, paths: Sequence[str], sizes: Sequence[int]) -> list[Module] | None:
    """Compact split when the parts use disjoint rank columns of ``up`` (block-diagonal: kohya ``split_qkv``, or a
    join of parts with different ``down`` s). Part *i* keeps only its columns C_i of ``up`` and rows C_i of ``down``;
    its alpha becomes ``scale · |C_i|`` so alpha/rank, hence ΔW, is unchanged (for ``split_qkv``: ``alpha / n``).
    Parts whose rows are all zero are left out (ΔW 0). None when the supports overlap (or every part is zero)."""
    up, down = module.tensors["up"], module.tensors["down"]
    masks = _support(up, sizes)
    total = np.zeros_like(masks[0], dtype=np.int64)
    for m in masks:
        total += m
    if np.any(total > 1) or not np.any(total):
        return None
    if all(m.all() for m in masks if m.any()) and sum(1 for m in masks if m.any()) == len(masks):
        return None
    scale = module.scale
    up_raw = up.raw().reshape(up.shape[0], -1)
    out = []
    start = 0
    for path, size, mask in zip(paths, sizes, masks):
        rows = slice(start, start + size)
        start += size
        cols = np.flatnonzero(mask)
        if cols.size == 0:
            continue
        r = int(cols.size)
        contiguous = cols[-1] - cols[0] + 1 == r
        tensors = dict(module.tensors)
        if contiguous:
            tensors["down"] = row_slice(down, int(cols[0]), int(cols[-1]) + 1)
        else:
            tensors["down"] = TensorRef.from_raw(f"{down.key}[cols]", down.dtype, np.ascontiguousarray(down.raw()[cols]))
        block = np.ascontiguousarray(up_raw[rows][:, cols]).reshape(size, r, *up.shape[2:])
        tensors["up"] = TensorRef.from_raw(f"{up.key}[{rows.start}:{rows.stop}]", up.dtype, block)
        if "bias" in tensors:
            tensors["bias"] = row_slice(tensors["bias"], rows.start, rows.stop)
        dora = row_slice(module.dora_scale, rows.start, rows.stop) if module.dora_scale is not None else None
        alpha = None if module.alpha is None else scale * r
        out.append(
            Module(
                path=path,
                algorithm="lora",
                tensors=tensors,
                alpha=alpha,
                alpha_dtype=module.alpha_dtype,  # kept; writers widen it when the value needs it
                dora_scale=dora,
                dora_axis=module.dora_axis,
                extras=dict(module.extras),
            )
        )
    return out


def alpha_dtype_for(value: float, dtype: str | None) -> str | None:
    """`dtype` when the alpha `value` is exactly representable in it, else F32 (so a written alpha never rounds)."""
    if dtype not in ("F16", "BF16"):
        return dtype
    back = float(to_float32(from_float32(np.asarray([value], dtype=np.float32), dtype), dtype).reshape(-1)[0])
    return dtype if back == value else "F32"


# ------------------------------------------------------------------------------------------ swap


def swap_module(module: Module, path: str) -> Module:
    """The module with the two output halves of its row tensors swapped (``adaLN_modulation.1`` <-> ``norm_out.linear``)."""
    row_roles = SPLITTABLE.get(module.algorithm)
    if row_roles is None:
        msg = f"algorithm {module.algorithm!r} on a shift/scale modulation cannot have its halves swapped exactly"
        raise FusedError(msg)
    if module.dora_scale is not None and module.dora_axis != "out":
        msg = "a DoRA magnitude per input column cannot follow a shift/scale swap"
        raise FusedError(msg)
    tensors = dict(module.tensors)
    for role in row_roles:
        if role in tensors:
            tensors[role] = swap_halves(tensors[role])
    dora = swap_halves(module.dora_scale) if module.dora_scale is not None else None
    return module.model_copy(update={"path": path, "tensors": tensors, "dora_scale": dora})


# ------------------------------------------------------------------------------------------ join


def _is_pow2(x: float) -> bool:
    if x <= 0 or not math.isfinite(x):
        return False
    m, _ = math.frexp(x)
    return m == 0.5


def scaled(ref: TensorRef, factor: float, dtype: str, key: str) -> TensorRef:
    """`ref` times `factor`, encoded as `dtype` (exact for powers of two, or when `dtype` is F32)."""
    if factor == 1.0 and ref.dtype == dtype:
        return ref
    values = ref.float32().astype(np.float64) * factor
    return TensorRef.from_raw(key, dtype, from_float32(values.astype(np.float32), dtype))


def join_modules(path: str, parts: Sequence[Module | None], sizes: Sequence[int]) -> tuple[Module, list[Diagnostic]]:
    """Join part modules (None = part absent, zero rows) into one module on the fused weight at `path`.

    Returns the module and notes (rank growth, folded scales, dtype promotion).
    """
    present = [(i, m) for i, m in enumerate(parts) if m is not None]
    if not present:
        msg = f"{path}: nothing to join"
        raise FusedError(msg)
    algos = {m.algorithm for _, m in present}
    if algos == {"lokr"}:
        if any(m.dora_scale is not None for _, m in present) and (
            len(present) != len(parts) or any(m.dora_scale is None or m.dora_axis != "out" for _, m in present)
        ):
            msg = f"{path}: DoRA LoKr parts can only be joined when every part is present with a per-output magnitude"
            raise FusedError(msg)
        return _join_lokr(path, parts, sizes), []
    if len(algos) != 1 or next(iter(algos)) not in SPLITTABLE:
        msg = f"{path}: parts with algorithms {sorted(algos)} cannot be joined exactly"
        raise FusedError(msg)
    algo = algos.pop()
    doras = [m.dora_scale is not None for _, m in present]
    if any(doras):
        if not all(doras) or len(present) != len(parts):
            msg = f"{path}: DoRA parts can only be joined when every part is present and DoRA"
            raise FusedError(msg)
        if any(m.dora_axis != "out" for _, m in present):
            msg = f"{path}: a DoRA magnitude per input column cannot be joined exactly (its norm spans every part)"
            raise FusedError(msg)
    if algo == "full":
        return _join_full(path, parts, sizes), []
    if any("mid" in m.tensors for _, m in present):
        msg = f"{path}: Tucker (lora_mid) parts cannot be joined"
        raise FusedError(msg)
    for i, m in present:
        if m.tensors["up"].shape[0] != sizes[i]:
            msg = f"{m.path}: {m.tensors['up'].shape[0]} output rows, expected {sizes[i]} for {path}"
            raise FusedError(msg)
    notes: list[Diagnostic] = []
    scales = [m.scale for _, m in present]
    first = present[0][1]
    down0 = first.tensors["down"]
    shared = len(set(scales)) == 1 and all(_same_values(m.tensors["down"], down0) for _, m in present[1:])
    up_dtype = _common_dtype([m.tensors["up"] for _, m in present])
    extra_shape = tuple(first.tensors["up"].shape[2:])
    total_rows = sum(sizes)
    has_bias = any("bias" in m.tensors for _, m in present)
    tensors: dict[str, TensorRef] = {}
    if shared:
        rank = down0.shape[0]
        ups = []
        for i, size in enumerate(sizes):
            m = parts[i]
            if m is None:
                zeros = np.zeros((size, *first.tensors["up"].shape[1:]), dtype=numpy_dtype(up_dtype))
                ups.append(TensorRef.from_raw(f"{path}.up[zeros]", up_dtype, zeros))
            else:
                ups.append(m.tensors["up"])
        tensors["down"] = down0
        tensors["up"] = concat_rows(ups, f"{path}.up")
        alpha = first.alpha
        alpha_dtype = first.alpha_dtype
    else:
        ranks = [m.tensors["down"].shape[0] for _, m in present]
        rank = sum(ranks)
        ref_scale = min(scales)
        ratios = [s / ref_scale for s in scales]
        if any(not _is_pow2(r) and r != 1.0 for r in ratios) and up_dtype in ("F16", "BF16"):
            up_dtype = "F32"
            notes.append(
                Diagnostic(
                    code="C003",
                    severity="info",
                    message=f"parts have scales {scales}: folded into the joined up matrix, stored as F32 so the fold is exact",
                    module=path,
                )
            )
        elif len(set(scales)) > 1:
            notes.append(
                Diagnostic(code="C003", severity="info", message=f"parts have scales {scales}: ratios folded into the joined up matrix", module=path)
            )
        up = np.zeros((total_rows, rank, *extra_shape), dtype=numpy_dtype(up_dtype))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        col = 0
        for (i, m), ratio in zip(present, ratios):
            block = scaled(m.tensors["up"], ratio, up_dtype, f"{m.path}.up").raw()
            r = m.tensors["down"].shape[0]
            up[starts[i] : starts[i] + sizes[i], col : col + r] = block.reshape(sizes[i], r, *extra_shape)
            col += r
        tensors["down"] = concat_rows([m.tensors["down"] for _, m in present], f"{path}.down")
        tensors["up"] = TensorRef.from_raw(f"{path}.up", up_dtype, up)
        alpha = ref_scale * rank
        alpha_dtype = first.alpha_dtype
        if all(m.alpha is None for _, m in present) and ref_scale == 1.0:
            alpha, alpha_dtype = None, None
        notes.append(
            Diagnostic(
                code="C002",
                severity="info",
                message=f"joined {len(present)} parts into {path}: down stacked, up block-diagonal, rank {ranks} -> {rank}",
                module=path,
            )
        )
    if has_bias:
        ratios_b = [1.0] * len(present) if shared else [s / min(scales) for s in scales]
        bias_dtype = _common_dtype([m.tensors["bias"] for _, m in present if "bias" in m.tensors])
        if not shared and any(not _is_pow2(r) and r != 1.0 for r in ratios_b) and bias_dtype in ("F16", "BF16"):
            bias_dtype = "F32"
        chunks = []
        lookup = dict(present)
        ratio_of = {i: ratios_b[k] for k, (i, _) in enumerate(present)}
        for i, size in enumerate(sizes):
            m = lookup.get(i)
            if m is None or "bias" not in m.tensors:
                chunks.append(TensorRef.from_raw(f"{path}.bias[zeros]", bias_dtype, np.zeros((size,), dtype=numpy_dtype(bias_dtype))))
            else:
                chunks.append(scaled(m.tensors["bias"], ratio_of[i], bias_dtype, f"{m.path}.bias"))
        tensors["bias"] = concat_rows(chunks, f"{path}.bias")
    dora = None
    if all(doras) and doras:
        dora = concat_rows([m.dora_scale for _, m in present], f"{path}.dora_scale")
    joined = Module(
        path=path,
        algorithm="lora",
        tensors=tensors,
        alpha=alpha,
        alpha_dtype=alpha_dtype,
        dora_scale=dora,
        dora_axis="out" if dora is not None else None,
        extras={},
    )
    return joined, notes


def _join_full(path: str, parts: Sequence[Module | None], sizes: Sequence[int]) -> Module:
    present = [m for m in parts if m is not None]
    first = present[0]
    tensors: dict[str, TensorRef] = {}
    for role in SPLITTABLE["full"]:
        if not any(role in m.tensors for m in present):
            continue
        dtype = _common_dtype([m.tensors[role] for m in present if role in m.tensors])
        tail = next(m.tensors[role].shape[1:] for m in present if role in m.tensors)
        chunks = []
        for m, size in zip(parts, sizes):
            if m is None or role not in m.tensors:
                chunks.append(TensorRef.from_raw(f"{path}.{role}[zeros]", dtype, np.zeros((size, *tail), dtype=numpy_dtype(dtype))))
            else:
                ref = m.tensors[role]
                chunks.append(ref if m.scale == 1.0 else scaled(ref, m.scale, "F32", f"{m.path}.{role}"))
        tensors[role] = concat_rows(chunks, f"{path}.{role}")
    return Module(
        path=path, algorithm="full", tensors=tensors, alpha=None, alpha_dtype=None, dora_scale=None, dora_axis=None, extras=dict(first.extras)
    )


# ------------------------------------------------------------------------------------------ name maps


class Target:
    """One native module and the canonical module(s) it becomes.

    ``kind``: ``rename`` (one canonical module, same tensors), ``fused`` (rows split by ``ratios``),
    ``swap`` (two output halves exchanged), ``swap2x`` (swapped only when the module has 2·in outputs:
    SD3's last ``context_block.adaLN_modulation.1``, which diffusers holds as an ``AdaLayerNormContinuous``).
    """

    __slots__ = ("native", "canonical", "kind", "ratios")

    def __init__(self, native: str, canonical: tuple[str, ...], kind: str = "rename", ratios: tuple[int, ...] = ()) -> None:
        self.native = native
        self.canonical = canonical
        self.kind = kind
        self.ratios = ratios or (1,) * len(canonical)

    def sizes(self, rows: int, index: int | None = None) -> list[int]:
        """Row count of every part, from the fused row count (index None) or from part `index`'s rows."""
        if index is None:
            unit, rem = divmod(rows, sum(self.ratios))
            if rem:
                msg = f"{self.native}: {rows} output rows do not split in the ratios {self.ratios}"
                raise FusedError(msg)
        else:
            unit, rem = divmod(rows, self.ratios[index])
            if rem:
                msg = f"{self.canonical[index]}: {rows} output rows do not fit the ratios {self.ratios}"
                raise FusedError(msg)
        return [unit * r for r in self.ratios]

    def __repr__(self) -> str:
        return f"Target({self.native!r} -> {self.canonical!r}, {self.kind})"


class NameMap:
    """Native <-> canonical module names of one transformer family, built from per-block and top-level tables.

    `blocks`: ``{native block prefix: (canonical block prefix, [(native suffix, canonical suffixes, kind, ratios)])}``,
    block prefixes without the index (``double_blocks`` -> ``transformer_blocks``); `top`: the same rows for
    modules outside the blocks.
    """

    def __init__(self, blocks: dict[str, tuple[str, list[tuple]]], top: list[tuple]) -> None:
        self._native_rows: dict[str, dict[str, tuple]] = {}
        self._canon_rows: dict[str, dict[str, tuple[tuple, int]]] = {}
        self._block_native_to_canon: dict[str, str] = {}
        self._block_canon_to_native: dict[str, str] = {}
        for nblock, (cblock, rows) in blocks.items():
            self._block_native_to_canon[nblock] = cblock
            self._block_canon_to_native[cblock] = nblock
            self._native_rows[nblock] = {row[0]: row for row in rows}
            self._canon_rows[cblock] = {c: (row, i) for row in rows for i, c in enumerate(row[1])}
        self._native_rows[""] = {row[0]: row for row in top}
        self._canon_rows[""] = {c: (row, i) for row in top for i, c in enumerate(row[1])}

    @staticmethod
    def _target(row: tuple, nprefix: str, cprefix: str) -> Target:
        native, canon = row[0], row[1]
        kind = row[2] if len(row) > 2 else "rename"
        ratios = row[3] if len(row) > 3 else ()
        return Target(nprefix + native, tuple(cprefix + c for c in canon), kind, ratios)

    @staticmethod
    def _split_block(path: str, blocks: dict[str, str]) -> tuple[str, str, str] | None:
        for block in blocks:
            if path.startswith(block + "."):
                index, _, rest = path[len(block) + 1 :].partition(".")
                if index.isdigit() and rest:
                    return block, index, rest
        return None

    def native(self, path: str) -> Target | None:
        """The target of a native module path (``double_blocks.3.img_attn.qkv``), or None."""
        hit = self._split_block(path, self._block_native_to_canon)
        if hit:
            block, index, rest = hit
            row = self._native_rows[block].get(rest)
            if row is None:
                return None
            return self._target(row, f"{block}.{index}.", f"{self._block_native_to_canon[block]}.{index}.")
        row = self._native_rows[""].get(path)
        return self._target(row, "", "") if row else None

    def canonical(self, path: str) -> tuple[Target, int] | None:
        """The target a canonical module path (``transformer_blocks.3.attn.to_k``) belongs to, and its index."""
        hit = self._split_block(path, self._block_canon_to_native)
        if hit:
            block, index, rest = hit
            got = self._canon_rows[block].get(rest)
            if got is None:
                return None
            row, i = got
            return self._target(row, f"{self._block_canon_to_native[block]}.{index}.", f"{block}.{index}."), i
        got = self._canon_rows[""].get(path)
        if got is None:
            return None
        row, i = got
        return self._target(row, "", ""), i


def _rows_of(module: Module) -> int:
    if module.algorithm == "lokr":
        _, a, b = _lokr_factor_rows(module)
        return a * b
    roles = SPLITTABLE.get(module.algorithm, ("up",))
    ref = module.tensors.get(roles[0])
    if ref is None:
        msg = f"{module.path}: algorithm {module.algorithm!r} has no output-row tensor"
        raise FusedError(msg)
    return ref.shape[0]


def _needs_swap(target: Target, module: Module) -> bool:
    if target.kind == "swap":
        return True
    if target.kind == "swap2x":
        roles = SPLITTABLE.get(module.algorithm)
        if roles is None:
            return True  # cannot tell; the caller reports the failure
        down = module.tensors.get("down")
        rows = _rows_of(module)
        cols = down.shape[1] if down is not None and len(down.shape) > 1 else (module.tensors[roles[0]].shape[1] if len(module.tensors[roles[0]].shape) > 1 else 0)
        return rows == 2 * cols
    return False


def native_to_canonical(
    modules: dict[str, Module],
    names: NameMap,
    *,
    component: str = "transformer",
    detect_block_diagonal: bool = False,
) -> tuple[dict[str, Module], dict[str, tuple[Module, str]]]:
    """Map modules with native paths ``<component>.<native>`` to canonical ones, splitting fused projections.

    Modules of other components pass through. Returns (canonical modules, {native path: (module, why)}) for
    modules that could not be mapped (unknown name, or an algorithm that cannot be split exactly).
    """
    out: dict[str, Module] = {}
    failed: dict[str, tuple[Module, str]] = {}
    prefix = component + "."
    for path, module in modules.items():
        if not path.startswith(prefix):
            out[path] = module
            continue
        rel = path[len(prefix) :]
        target = names.native(rel)
        if target is None:
            failed[path] = (module, f"unknown {component} module {rel!r}")
            continue
        try:
            if target.kind == "fused":
                sizes = target.sizes(_rows_of(module))
                parts = split_module(module, [prefix + c for c in target.canonical], sizes, detect_block_diagonal=detect_block_diagonal)
            elif _needs_swap(target, module):
                parts = [swap_module(module, prefix + target.canonical[0])]
            else:
                parts = [module.model_copy(update={"path": prefix + target.canonical[0]})]
        except FusedError as exc:
            failed[path] = (module, str(exc))
            continue
        for part in parts:
            out[part.path] = part
    return out, failed


def canonical_to_native(
    modules: dict[str, Module],
    names: NameMap,
    *,
    component: str = "transformer",
) -> tuple[dict[str, Module], list[Diagnostic], dict[str, tuple[list[str], str]]]:
    """Inverse of :func:`native_to_canonical`: join split parts back onto fused projections.

    Returns (native modules, notes, {native path: (canonical paths, why)} for groups that cannot be written:
    a canonical module with no native name, or parts that cannot be joined exactly).
    """
    out: dict[str, Module] = {}
    notes: list[Diagnostic] = []
    failed: dict[str, tuple[list[str], str]] = {}
    groups: dict[str, tuple[Target, dict[int, Module]]] = {}
    prefix = component + "."
    for path, module in modules.items():
        if not path.startswith(prefix):
            out[path] = module
            continue
        hit = names.canonical(path[len(prefix) :])
        if hit is None:
            failed[path] = ([path], "no native name for this module")
            continue
        target, index = hit
        groups.setdefault(target.native, (target, {}))[1][index] = module
    for native, (target, parts) in groups.items():
        npath = prefix + native
        try:
            if target.kind == "fused":
                index, sample = next(iter(parts.items()))
                sizes = target.sizes(_rows_of(sample), index)
                joined, more = join_modules(npath, [parts.get(i) for i in range(len(target.canonical))], sizes)
                if len(parts) < len(target.canonical):
                    missing = [target.canonical[i] for i in range(len(target.canonical)) if i not in parts]
                    more.append(
                        Diagnostic(code="C004", severity="info", message=f"{npath}: absent parts {missing} written as zero rows", module=npath)
                    )
                notes.extend(more)
                out[npath] = joined
            else:
                module = parts[0]
                out[npath] = swap_module(module, npath) if _needs_swap(target, module) else module.model_copy(update={"path": npath})
        except FusedError as exc:
            failed[npath] = ([m.path for m in parts.values()], str(exc))
    return out, notes, failed


def names_for(family: str | None) -> NameMap | None:
    """The native name map of a transformer family (``flux1``: BFL, ``sd3``: SAI MMDiT), else None."""
    if family == "flux1":
        from lorafmt.naming.flux import FLUX_NAMES

        return FLUX_NAMES
    if family == "sd3":
        from lorafmt.naming.sd3 import SD3_NAMES

        return SD3_NAMES
    return None


def keep_failed(
    failed: dict[str, tuple[Module, str]],
    unplaced: dict[str, TensorRef],
    issues: list,
    raw_module: Callable[[str], str] = lambda key: key.split(".", 1)[0],
) -> None:
    """Record modules :func:`native_to_canonical` could not map: their raw keys go to ``unplaced`` (never dropped)
    with an ``R007`` diagnostic each. `raw_module` turns a tensor's raw key into its module's raw name (the alpha
    key is ``<raw module>.alpha``)."""
    for path, (module, why) in failed.items():
        refs = list(module.all_tensors().values())
        for ref in refs:
            unplaced[ref.key] = ref
        if module.alpha is not None and refs:
            key = f"{raw_module(refs[0].key)}.alpha"
            unplaced[key] = TensorRef.from_array(key, np.asarray(module.alpha, dtype=np.float32), module.alpha_dtype or "F32")
        issues.append(Diagnostic(code="R007", severity="error", message=f"cannot place {path}: {why}", key=refs[0].key if refs else None, module=path))
