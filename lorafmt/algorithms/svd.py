"""Approximate any module whose ΔW is known as a plain LoRA by truncated SVD (numpy, float64).

Used by ``convert``/``write`` with ``allow_lossy=True, approx_rank=R`` when the target layout cannot express a
module's algorithm (LoHa/LoKr/full into ``diffusers``, Tucker ``lora_mid`` into PEFT, ...). The result is exact
when ΔW's rank is at most R; otherwise the relative Frobenius error ``‖ΔW − ΔW_R‖ / ‖ΔW‖`` is reported —
measured on the factors as stored (after rounding to the output dtype), so it is what a reader of the file sees.

Conv ΔW ``(out, in, kh, kw)`` is factorised as ``(out, in·kh·kw)``: ``down (R, in, kh, kw)``, ``up (out, R, 1, 1)``
(the LoCon shape every loader accepts). The scale is folded into the factors (``alpha = R``, scale 1); the
singular values are split evenly (``up = U·√S``, ``down = √S·Vᵀ``). A DoRA magnitude is kept as is.

Algorithms whose effect needs the base weight (IA3, OFT) cannot be approximated without it.

Example:
    >>> import numpy as np
    >>> from lorafmt.schema import Module, TensorRef
    >>> m = Module(path="unet.x", algorithm="full", tensors={"diff": TensorRef.from_array("d", np.outer([1, 2], [3, 4, 5]))})
    >>> lora, err = approximate_as_lora(m, rank=1)
    >>> lora.algorithm, lora.rank, round(err, 6)
    ('lora', 1, 0.0)
"""

from __future__ import annotations

import numpy as np

from lorafmt.algorithms import get_algorithm
from lorafmt.errors import UnsupportedFeatureError
from lorafmt.schema import Module, TensorRef

__all__ = ["approximate_as_lora", "low_rank", "fold_tucker"]


def low_rank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(up (out, r), down (r, rest), relative Frobenius error) of the best rank-`rank` approximation of a matrix."""
    mat = np.asarray(delta, dtype=np.float64).reshape(delta.shape[0], -1)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    r = max(1, min(int(rank), s.size))
    root = np.sqrt(s[:r])
    up = u[:, :r] * root
    down = root[:, None] * vt[:r]
    total = float(np.sqrt(np.sum(s**2)))
    err = float(np.sqrt(np.sum(s[r:] ** 2))) / total if total > 0 else 0.0
    return up, down, err


def approximate_as_lora(module: Module, rank: int, *, dtype: str | None = None) -> tuple[Module, float]:
    """A ``lora`` module of rank ≤ `rank` approximating `module`'s ΔW, and its relative error.

    `dtype` is the storage dtype of the new factors (default: the first tensor's float dtype, else F32).
    """
    algo = get_algorithm(module.algorithm)
    if algo.needs_base:
        msg = f"a {module.algorithm} module cannot be approximated as LoRA without the base weight"
        raise UnsupportedFeatureError(msg, module=module.path)
    if rank < 1:
        msg = f"approximation rank must be at least 1, got {rank}"
        raise UnsupportedFeatureError(msg, module=module.path)
    delta = algo.delta(module)
    shape = algo.weight_shape(module) or tuple(delta.shape)
    if delta.ndim == 1:
        msg = f"a {module.algorithm} module changes a vector (norm weights); it has no low-rank form"
        raise UnsupportedFeatureError(msg, module=module.path)
    up, down, _ = low_rank(delta, rank)
    r = up.shape[1]
    if len(shape) == 4:
        down = down.reshape(r, shape[1], shape[2], shape[3])
        up = up.reshape(up.shape[0], r, 1, 1)
    if dtype is None:
        first = next(iter(module.tensors.values()))
        dtype = first.dtype if first.dtype in ("F16", "BF16", "F32") else "F32"
    tensors = {
        "down": TensorRef.from_array(f"{module.path}.down", down.astype(np.float32), dtype),
        "up": TensorRef.from_array(f"{module.path}.up", up.astype(np.float32), dtype),
    }
    # the error of what is stored (after rounding to `dtype`), so a reader of the written file measures the same
    stored = tensors["up"].float32().reshape(shape[0], -1).astype(np.float64) @ tensors["down"].float32().reshape(
        r, -1
    ).astype(np.float64)
    ref = delta.reshape(delta.shape[0], -1).astype(np.float64)
    norm = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(ref - stored)) / norm if norm > 0 else 0.0
    new = Module(
        path=module.path,
        algorithm="lora",
        tensors=tensors,
        alpha=float(r),
        alpha_dtype=module.alpha_dtype,
        dora_scale=module.dora_scale,
        dora_axis=module.dora_axis,
    )
    return new, err


def fold_tucker(module: Module) -> Module:
    """The same LoCon without its Tucker core: ``down' = mid ×₁ down`` of shape (r, in, kh, kw), ``up`` unchanged.

    Exact re-factorisation (ΔW = up · mid · down = up · down'), for layouts whose conv LoRA has a k×k ``lora_A``
    and no ``lora_mid`` (diffusers, PEFT). ``down'`` is computed, stored as float32 so no precision is lost.

    Example:
        >>> import numpy as np
        >>> from lorafmt.algorithms import get_algorithm
        >>> rng = np.random.default_rng(0)
        >>> t = {"down": (2, 3, 1, 1), "mid": (2, 2, 3, 3), "up": (4, 2, 1, 1)}
        >>> m = Module(path="unet.c", alpha=1.0, tensors={r: TensorRef.from_array(r, rng.standard_normal(s)) for r, s in t.items()})
        >>> f = fold_tucker(m)
        >>> sorted(f.tensors), f.tensors["down"].shape, f.scale == m.scale
        (['down', 'up'], (2, 3, 3, 3), True)
        >>> bool(np.allclose(get_algorithm("lora").delta(f), get_algorithm("lora").delta(m), atol=1e-5))
        True
    """
    import numpy as np

    down = module.tensors["down"].float32()
    mid = module.tensors["mid"].float32()
    folded = np.einsum("jk...,kl->jl...", mid, down.reshape(down.shape[0], -1))
    if down.ndim == 2 and all(k == 1 for k in mid.shape[2:]):
        folded = folded.reshape(folded.shape[0], folded.shape[1])  # a 1×1 core on a Linear stays a matrix
    tensors = {k: v for k, v in module.tensors.items() if k not in ("down", "mid")}
    tensors["down"] = TensorRef.from_array(module.tensors["down"].key, folded.astype(np.float32), "F32")
    return module.model_copy(update={"tensors": tensors})
