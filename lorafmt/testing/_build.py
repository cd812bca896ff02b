"""Build small, real LoRAs in memory from module shapes (the engine behind the hypothesis strategies)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lorafmt.schema import LoraFile, Module, Provenance, TensorRef
from lorafmt.testing._shapes import module_shapes

__all__ = ["make_lora", "make_module", "ALGORITHMS_SUPPORTED"]

#: Algorithms the builders can generate.
ALGORITHMS_SUPPORTED = ("lora", "loha", "lokr", "full")


def _factor_pair(n: int) -> tuple[int, int]:
    """Split n into (a, b), a <= b, a as close to sqrt(n) as possible (LyCORIS's `factorization`)."""
    a = int(math.isqrt(n))
    while a > 1 and n % a:
        a -= 1
    return a, n // a


def make_module(
    path: str,
    weight_shape: tuple[int, ...],
    *,
    algorithm: str = "lora",
    rank: int = 4,
    alpha: float | None = None,
    dtype: str = "F32",
    rng: np.random.Generator | None = None,
) -> Module:
    """One module of `algorithm` for a base weight of `weight_shape` ((out, in) or (out, in, kh, kw)).

    Values are small random numbers, so ΔW is non-zero and finite in fp16.
    """
    rng = rng or np.random.default_rng(0)
    out_f, in_f = weight_shape[0], weight_shape[1]
    kernel = tuple(weight_shape[2:])
    rank = max(1, min(rank, out_f, in_f))

    def arr(*shape: int) -> TensorRef:
        return rng.standard_normal(shape).astype(np.float32) * np.float32(0.05)

    def ref(name: str, *shape: int) -> TensorRef:
        return TensorRef.from_array(f"{path}.{name}", arr(*shape), dtype)

    if algorithm == "lora":
        if kernel:
            tensors = {"down": ref("down", rank, in_f, *kernel), "up": ref("up", out_f, rank, 1, 1)}
        else:
            tensors = {"down": ref("down", rank, in_f), "up": ref("up", out_f, rank)}
    elif algorithm == "loha":
        flat_in = in_f * math.prod(kernel)
        tensors = {
            "w1_a": ref("w1_a", out_f, rank),
            "w1_b": ref("w1_b", rank, flat_in),
            "w2_a": ref("w2_a", out_f, rank),
            "w2_b": ref("w2_b", rank, flat_in),
        }
    elif algorithm == "lokr":
        o1, o2 = _factor_pair(out_f)
        i1, i2 = _factor_pair(in_f)
        tensors = {"w1": ref("w1", o1, i1), "w2_a": ref("w2_a", o2, rank), "w2_b": ref("w2_b", rank, i2 * math.prod(kernel))}
        if kernel:
            tensors["w2_b"] = ref("w2_b", rank, i2, *kernel)
    elif algorithm == "full":
        tensors = {"diff": ref("diff", *weight_shape)}
        alpha = None
    else:
        msg = f"cannot generate algorithm {algorithm!r}; supported: {', '.join(ALGORITHMS_SUPPORTED)}"
        raise ValueError(msg)
    return Module(path=path, algorithm=algorithm, tensors=tensors, alpha=alpha)


def make_lora(
    family: str = "sd1",
    *,
    modules: Sequence[str] | int | None = None,
    algorithm: str = "lora",
    rank: int = 4,
    alpha: float | None = None,
    dtype: str = "F32",
    seed: int = 0,
    metadata: dict[str, str] | None = None,
) -> LoraFile:
    """A small LoRA for `family` on real module paths and shapes.

    Args:
        modules: module paths, a count (the first N targets in model order, spread over components), or None
            (a small default set of attention projections, incl. cross-attention so the family is detectable).

    Example:
        >>> from lorafmt.testing import make_lora
        >>> lora = make_lora("sd1", modules=4, rank=2, alpha=1.0)
        >>> len(lora.modules), sorted({m.rank for m in lora.modules.values()})
        (4, [2])
    """
    shapes = module_shapes(family)
    if modules is None:
        paths = [p for p in shapes if p.endswith((".attn2.to_k", ".attn2.to_v"))][:4]
        paths += [p for p in shapes if p.endswith(".self_attn.q_proj")][:1]
    elif isinstance(modules, int):
        cross = [p for p in shapes if p.endswith(".attn2.to_k")][:1]
        rest = [p for p in shapes if p not in cross]
        paths = (cross + rest)[: max(0, modules)]
    else:
        unknown = [p for p in modules if p not in shapes]
        if unknown:
            msg = f"not a {family} LoRA target: {unknown[0]}"
            raise ValueError(msg)
        paths = list(modules)
    rng = np.random.default_rng(seed)
    mods = {p: make_module(p, shapes[p], algorithm=algorithm, rank=rank, alpha=alpha, dtype=dtype, rng=rng) for p in paths}
    return LoraFile(family=family, modules=mods, metadata=dict(metadata or {}), provenance=Provenance(source=None))
