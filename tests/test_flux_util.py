"""Helpers for the Flux/SD3 tests: turn a corpus key/shape manifest into a real .safetensors file.

Values are small random numbers (seeded per key); alphas are scalars. Manifests can be cut to a few blocks so the
tests stay fast while keeping real widths (family detection reads them).
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from lorafmt.dtypes import from_float32, numpy_dtype

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "corpus" / "real"
_BLOCK = re.compile(r"(?:^|[._])(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|joint_blocks|layers|block)[._](\d+)[._]")


def load_manifest(name: str) -> dict:
    return json.loads((CORPUS / f"{name}.json").read_text())


def block_indices(key: str) -> list[int]:
    return [int(m.group(2)) for m in _BLOCK.finditer(key)]


def subset(tensors: dict, max_block: int = 0) -> dict:
    """Keys whose block indices are all <= max_block (top-level modules are always kept)."""
    return {k: v for k, v in tensors.items() if all(i <= max_block for i in block_indices(k))}


def _seed(key: str) -> int:
    return zlib.crc32(key.encode())


_DOWN = (".lora_down.weight", ".lora_A.weight", ".down.weight")
_UP = (".lora_up.weight", ".lora_B.weight", ".up.weight")


def _shrunk(key: str, shape: list[int], max_rank: int | None) -> list[int]:
    """Cut the rank axis to `max_rank` (widths, which detection reads, are kept)."""
    if max_rank is None or len(shape) < 2:
        return shape
    if key.endswith(_DOWN):
        return [min(shape[0], max_rank), *shape[1:]]
    if key.endswith(_UP):
        return [shape[0], min(shape[1], max_rank), *shape[2:]]
    return shape


def materialize(
    name: str,
    out: Path,
    *,
    max_block: int | None = 0,
    max_rank: int | None = 8,
    default_dtype: str = "F16",
    alpha: float | None = None,
) -> Path:
    """Write manifest `name` as a safetensors file with random values; returns the path."""
    man = load_manifest(name)
    tensors = man["tensors"] if max_block is None else subset(man["tensors"], max_block)
    arrays = {}
    for key, info in tensors.items():
        shape = info["shape"]
        shape = shape if shape is None else _shrunk(key, shape, max_rank)
        dtype = info.get("dtype") or default_dtype
        if shape is None:
            raise ValueError(f"{name}: {key} has no shape")
        rng = np.random.default_rng(_seed(key))
        if shape == [] or key.endswith(".alpha"):
            a = alpha if alpha is not None else float(rng.integers(1, 17))
            values = np.asarray(a, dtype=np.float32).reshape(shape)
        elif key.endswith(".scale"):
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif "dora_scale" in key or "magnitude" in key:
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            values = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        raw = from_float32(values, dtype) if dtype in ("F16", "BF16") else values.astype(numpy_dtype(dtype))
        arrays[key] = np.ascontiguousarray(raw)
    meta = {k: str(v) for k, v in (man.get("metadata") or {}).items()}
    _save(arrays, {k: (tensors[k].get("dtype") or default_dtype) for k in arrays}, out, meta)
    return out


def _save(arrays: dict, dtypes: dict, out: Path, metadata: dict) -> None:
    """safetensors.numpy cannot hold bf16 (numpy has none): write the header ourselves."""
    header: dict = {}
    blobs = []
    offset = 0
    for key, arr in arrays.items():
        data = arr.tobytes()
        header[key] = {"dtype": dtypes[key], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for b in blobs:
            fh.write(b)


def save_arrays(arrays: dict[str, np.ndarray], out: Path, dtype: str = "F16", metadata: dict | None = None) -> Path:
    """Write float arrays (encoded to `dtype`) as safetensors."""
    enc = {k: np.ascontiguousarray(from_float32(np.asarray(v, dtype=np.float32), dtype)).reshape(np.shape(v)) for k, v in arrays.items()}
    _save(enc, dict.fromkeys(enc, dtype), out, metadata or {})
    return out


del save_file


# ------------------------------------------------------------------------------------------ ΔW comparison


def _factor(ref) -> np.ndarray:
    return ref.float32().astype(np.float64)


def probe_delta(module, x_cache: dict) -> np.ndarray:
    """ΔW @ X for a fixed random X (cheap for low-rank factors): equal probes <=> equal ΔW (with probability 1)."""
    if module.algorithm == "lora":
        down = _factor(module.tensors["down"])
        down = down.reshape(down.shape[0], -1)
        up = _factor(module.tensors["up"]).reshape(module.tensors["up"].shape[0], -1)
        x = _probe(down.shape[1], x_cache)
        return module.scale * _mm(up, _mm(down, x))
    if module.algorithm == "full":
        diff = _factor(module.tensors["diff"])
        if diff.ndim == 1:
            return diff[:, None]
        diff = diff.reshape(diff.shape[0], -1)
        return _mm(diff, _probe(diff.shape[1], x_cache))
    from lorafmt.api import module_delta

    d = module_delta(module).astype(np.float64)
    d = d.reshape(d.shape[0], -1)
    return _mm(d, _probe(d.shape[1], x_cache))


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product without BLAS threads (they contend badly on small shared CI machines)."""
    return np.einsum("ij,jk->ik", a, b, optimize=False)


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(a * a)))


def _probe(n: int, cache: dict) -> np.ndarray:
    if n not in cache:
        cache[n] = np.random.default_rng(n).standard_normal((n, 3))
    return cache[n]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return _norm(a - b) / max(_norm(a), _norm(b), 1e-30)


def compare(la, lb, *, tol: float) -> list[str]:
    """Problems between two canonical LoRAs: module sets, ΔW per module (probe), bias, DoRA, mode."""
    problems = []
    only_a = sorted(set(la.modules) - set(lb.modules))
    only_b = sorted(set(lb.modules) - set(la.modules))
    if only_a:
        problems.append(f"lost modules: {only_a[:5]} ({len(only_a)})")
    if only_b:
        problems.append(f"extra modules: {only_b[:5]} ({len(only_b)})")
    cache: dict = {}
    for path in sorted(set(la.modules) & set(lb.modules)):
        ma, mb = la.modules[path], lb.modules[path]
        if ma.mode != mb.mode:
            problems.append(f"{path}: mode {ma.mode} != {mb.mode}")
        err = _rel(probe_delta(ma, cache), probe_delta(mb, cache))
        if not err <= tol:
            problems.append(f"{path}: ΔW rel error {err:.3g}")
        ba, bb = ma.tensors.get("bias"), mb.tensors.get("bias")
        if (ba is None) != (bb is None):
            problems.append(f"{path}: bias present in one only")
        elif ba is not None and _rel(ma.scale * _factor(ba), mb.scale * _factor(bb)) > tol:
            problems.append(f"{path}: bias differs")
        da, db = ma.dora_scale, mb.dora_scale
        if (da is None) != (db is None):
            problems.append(f"{path}: DoRA present in one only")
        elif da is not None and _rel(_factor(da).reshape(-1), _factor(db).reshape(-1)) > tol:
            problems.append(f"{path}: DoRA magnitude differs")
    return problems


def sample(lora, n: int = 1):
    """A copy of `lora` holding its `n` smallest modules (lorafmt.diff builds dense ΔW; Flux ones are 12288x3072)."""
    import math

    from lorafmt.algorithms._base import target_shape_of

    keys = sorted(lora.modules, key=lambda k: (math.prod(target_shape_of(lora.modules[k]) or (1 << 40,)), k))[:n]
    return lora.model_copy(update={"modules": {k: lora.modules[k] for k in keys}})
