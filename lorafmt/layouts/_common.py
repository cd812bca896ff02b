"""Helpers every layout uses: grouping keys into modules, structural checks, alpha scalars.

Not a layout: layouts import this, never each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import lru_cache

from lorafmt.algorithms import algorithm_for_params, available_algorithms, get_algorithm
from lorafmt.io.safetensors_io import ScalarReader
from lorafmt.io.source import Source
from lorafmt.schema import Diagnostic, LoraFile, Module, Provenance, TensorRef

__all__ = [
    "carried_metadata",
    "KNOWN_PARAMS",
    "ModuleParts",
    "assemble",
    "alpha_tensor",
    "issue",
    "lycoris_param_to_role",
    "module_params",
]

# Per-module keys every kohya-family reader understands beside the algorithm's own parameters.
EXTRA_PARAMS = ("alpha", "dora_scale", "scale")
EXTRA_PARAMS_SET = frozenset(EXTRA_PARAMS)


def lycoris_param_to_role() -> dict[str, tuple[str, str]]:
    """LyCORIS/kohya parameter name -> (algorithm, role)."""
    table: dict[str, tuple[str, str]] = {}
    for algo in available_algorithms():
        for role, param in algo.param_names.items():
            table.setdefault(param, (algo.name, role))
    return table


def KNOWN_PARAMS() -> frozenset[str]:  # noqa: N802 - a computed constant
    return frozenset(lycoris_param_to_role()) | frozenset(EXTRA_PARAMS)


# Metadata that belongs to one layout's own alpha/config mechanism and goes stale once the file is rewritten.
LAYOUT_OWNED_METADATA = frozenset({"lora_adapter_metadata"})


def carried_metadata(lora: LoraFile) -> dict[str, str]:
    """The source's metadata to carry into any output: everything but other layouts' own config entries."""
    return {k: v for k, v in lora.metadata.items() if k not in LAYOUT_OWNED_METADATA}


def issue(
    code: str,
    message: str,
    *,
    key: str | None = None,
    module: str | None = None,
    severity: str = "error",
    keys: Iterable[str] = (),
) -> Diagnostic:
    """A read-time finding; `keys` lists every raw key it explains (so validators don't report them twice)."""
    data = {"keys": sorted(keys)} if keys else {}
    return Diagnostic(code=code, severity=severity, message=message, key=key, module=module, data=data)


class ModuleParts:
    """Tensors collected for one raw module name before it becomes a :class:`Module`."""

    def __init__(self, path: str, raw_name: str) -> None:
        self.path = path
        self.raw_name = raw_name
        self.params: dict[str, TensorRef] = {}

    def add(self, param: str, ref: TensorRef) -> None:
        self.params[param] = ref


def module_params(params: Iterable[str]) -> tuple[str | None, dict[str, str]]:
    """Pick the algorithm for a set of LyCORIS-style parameter names; returns (algorithm, param -> role).

    The returned mapping is shared between calls with the same names: read it, do not change it.
    """
    return _module_params(frozenset(params))


@lru_cache(maxsize=256)  # a file has a handful of parameter-name sets, repeated over hundreds of modules
def _module_params(params: frozenset[str]) -> tuple[str | None, dict[str, str]]:
    algo = algorithm_for_params(set(params - EXTRA_PARAMS_SET))
    if algo is None:
        return None, {}
    inverse = {p: r for r, p in algo.param_names.items()}
    return algo.name, {p: inverse[p] for p in params if p in inverse}


@lru_cache(maxsize=256)
def _module_plan(params: frozenset[str]) -> tuple[str | None, dict[str, str], tuple[str, ...]]:
    """(algorithm, param -> role, leftover params) for a set of parameter names; leftovers are parameters that
    neither the algorithm nor the shared extras explain (kept as unplaced)."""
    algo_name, roles = _module_params(params)
    return algo_name, roles, tuple(sorted(params - set(roles) - EXTRA_PARAMS_SET))


def alpha_tensor(value: float, dtype: str | None, like: str | None = None) -> TensorRef:
    """An alpha scalar in `dtype`; without one, in the weights' dtype `like` when that holds it exactly
    (sd-scripts saves alpha in the save dtype), else float32. Encoded without numpy for float dtypes."""
    # cached by value, except ±0.0 (equal as cache keys, different bytes)
    encoded = _alpha_bytes(value, dtype, like) if value else _alpha_bytes.__wrapped__(value, dtype, like)
    if encoded is not None:
        return TensorRef.from_bytes("alpha", encoded[0], (), encoded[1])
    import numpy as np  # fp8 or integer alphas: rare enough to pay for numpy

    return TensorRef.from_array("alpha", np.asarray(value, dtype=np.float32), dtype)


@lru_cache(maxsize=1024)  # a file's modules share a handful of alpha values
def _alpha_bytes(value: float, dtype: str | None, like: str | None) -> tuple[str, bytes] | None:
    import struct

    from lorafmt.dtypes import encode_float32_scalar, float32_round
    from lorafmt.io.safetensors_io import decode_scalar

    rounded = float32_round(value)
    if rounded is None:  # beyond float32 (only a hand-edited config gets here): keep it finite rather than write inf
        return "F64", struct.pack("<d", value)
    if dtype is None:
        dtype = "F32"
        if like in ("F16", "BF16"):
            encoded = encode_float32_scalar(rounded, like)
            if encoded is not None and decode_scalar(encoded, like) == rounded:
                dtype = like
    data = encode_float32_scalar(rounded, dtype)
    return None if data is None else (dtype, data)


def dora_axis_of(ref: TensorRef, up_shape: tuple[int, ...] | None) -> str | None:
    """Output-axis magnitudes are shaped (out, 1[,1,1]) or (out,); input-axis ones (1, in[,1,1])."""
    shape = ref.shape
    if len(shape) == 1:
        return "out"
    if len(shape) >= 2 and shape[0] == 1 and shape[1] != 1:
        return "in"
    if len(shape) >= 2 and shape[1] == 1 and shape[0] != 1:
        return "out"
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == 1:
        return "out" if up_shape is not None and up_shape[0] == 1 else "in"
    return None


def assemble(
    groups: dict[str, ModuleParts],
    source: Source,
    *,
    layout: str,
    unplaced: dict[str, TensorRef],
    issues: list,
    evidence: list[str],
    read_alpha: Callable[[TensorRef], float] | None = None,
) -> LoraFile:
    """Turn collected parts into Modules, recording (not raising) structural problems."""
    with ScalarReader() as scalars:
        return _assemble(groups, source, layout, unplaced, issues, evidence, read_alpha or scalars.read)


def _assemble(groups, source, layout, unplaced, issues, evidence, read_alpha) -> LoraFile:
    modules: dict[str, Module] = {}
    seen_raw: dict[str, str] = {}
    for parts in groups.values():
        algo_name, roles, leftovers = _module_plan(frozenset(parts.params))
        if algo_name is None:
            for param, ref in parts.params.items():
                unplaced[ref.key] = ref
            if set(parts.params) <= set(EXTRA_PARAMS):
                # e.g. an `alpha` whose lora_down/lora_up were deleted or renamed
                message = f"{' and '.join(sorted(parts.params))} with no weights: module {parts.raw_name!r} has no adapter tensors"
            else:
                message = f"no algorithm explains parameters {sorted(parts.params)}"
            issues.append(issue("R001", message, key=next(iter(parts.params.values())).key, module=parts.path, keys=[r.key for r in parts.params.values()]))
            continue
        tensors = {role: parts.params[p] for p, role in roles.items()}
        algo_name = get_algorithm(algo_name).classify(tensors)  # e.g. 4-D oft_blocks are BOFT
        alpha = alpha_dtype = None
        if "alpha" in parts.params:
            ref = parts.params["alpha"]
            try:
                alpha = read_alpha(ref)
                alpha_dtype = ref.dtype
            except ValueError as exc:
                issues.append(issue("R004", str(exc), key=ref.key, module=parts.path))
                unplaced[ref.key] = ref
        extras = {}
        if "scale" in parts.params:
            extras["scale"] = parts.params["scale"]
        dora = parts.params.get("dora_scale")
        module = Module(
            path=parts.path,
            algorithm=algo_name,
            tensors=tensors,
            alpha=alpha,
            alpha_dtype=alpha_dtype,
            dora_scale=dora,
            dora_axis=dora_axis_of(dora, tensors["up"].shape if "up" in tensors else None) if dora is not None else None,
            extras=extras,
        )
        for p in leftovers:
            unplaced[parts.params[p].key] = parts.params[p]
        problems = get_algorithm(algo_name).check(module)
        empty = [] if problems or not any(0 in ref.shape for ref in tensors.values()) else sorted(
            role for role, ref in tensors.items() if ref.numel == 0
        )
        if empty:
            problems = [f"empty {'/'.join(empty)} tensor(s): shapes {[list(tensors[r].shape) for r in empty]}"]
        if problems:
            for prob in problems:
                code = "R002" if prob.startswith("missing") else "R003"
                issues.append(
                    issue(code, prob, key=next(iter(parts.params.values())).key, module=parts.path, keys=[r.key for r in parts.params.values()])
                )
            # An orphan half, mismatched ranks or non-matrix factors cannot make a weight change: keep the keys
            # visible (unplaced) and the finding (issues), never a module that diff/fuse/write would compute with.
            for ref in parts.params.values():
                unplaced[ref.key] = ref
            continue
        zero_ok = get_algorithm(algo_name).zero_alpha_ok  # OFT: alpha is a constraint, 0 = none
        if alpha is not None and (not math.isfinite(alpha) or alpha < 0 or (alpha == 0 and not zero_ok)):
            issues.append(
                issue("R004", f"alpha {alpha} is not a positive finite number", key=parts.params["alpha"].key, module=parts.path)
            )
        if parts.path in modules:
            issues.append(
                issue(
                    "R005",
                    f"module spelled twice: {seen_raw[parts.path]!r} and {parts.raw_name!r}",
                    key=parts.raw_name,
                    module=parts.path,
                    keys=[r.key for r in parts.params.values()],
                )
            )
            for ref in parts.params.values():
                unplaced[ref.key] = ref
            continue
        seen_raw[parts.path] = parts.raw_name
        modules[parts.path] = module
    lora = LoraFile(
        modules=dict(sorted(modules.items())),
        metadata=dict(source.metadata),
        unplaced=unplaced,
        issues=issues,
        provenance=Provenance(source=source.path, layout=layout, evidence=evidence),
    )
    return lora

