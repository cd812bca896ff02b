"""DoRA (weight-decomposed low-rank adaptation): the magnitude conventions of each producer and the patched weight.

DoRA is a flag on a module (``Module.dora_scale`` + ``Module.dora_axis``), not an algorithm: any algorithm's ΔW
can carry a magnitude. The patched weight is ::

    W' = m · (W + ΔW) / ‖W + ΔW‖

where the norm is taken

* per **output row** (``axis="out"``): PEFT ``lora_magnitude_vector`` (``DoraLinearLayer.get_weight_norm``:
  ``norm(W + s·BA, dim=1)``; conv: over (in, kh, kw)), LyCORIS ``wd_on_out=True`` (its default since 2025-04),
  OneTrainer ``dora_on_output``;
* per **input column** (``axis="in"``): LyCORIS ``wd_on_out=False`` (older default), OneTrainer's default
  kohya output; A1111 and InvokeAI always normalise this way.

Canonical storage (what every layout reads into): ``dora_scale`` shaped the kohya/LyCORIS way —
``(out, 1[, 1, 1])`` for the output axis, ``(1, in[, 1, 1])`` for the input axis. PEFT stores the output-axis
magnitude as ``(out,)`` for Linear and ``(1, out, 1, 1)`` for Conv2d; :func:`peft_magnitude_shape` and
:func:`canonical_magnitude_shape` translate (same bytes, another shape). Converting between producers is exact
when the axes agree (the magnitude *is* the same vector) and impossible when they don't: an input-axis magnitude
cannot be expressed per output row without the base weight.

Example:
    >>> import numpy as np
    >>> from lorafmt.algorithms.dora import apply_dora
    >>> W = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    >>> apply_dora(W, np.zeros_like(W), np.array([[10.0], [1.0]], np.float32), "out").tolist()
    [[6.0, 8.0], [0.0, 1.0]]
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command


if TYPE_CHECKING:
    import numpy as np


__all__ = [
    "apply_dora",
    "weight_norm",
    "canonical_magnitude_shape",
    "peft_magnitude_shape",
    "initial_magnitude",
    "adopt_peft_magnitude",
]

_EPS = 1.1920928955078125e-07  # float32 eps; LyCORIS/ComfyUI add float eps to the norm; PEFT does not (difference ~1e-7)


def weight_norm(weight: np.ndarray, axis: str) -> np.ndarray:
    """‖W‖ per output row (``axis="out"``, shape (out, 1, …)) or per input column (``"in"``, shape (1, in, …))."""
    import numpy as np
    w = np.asarray(weight, dtype=np.float32)
    rest = (1,) * (w.ndim - 1)
    if axis == "out":
        return np.linalg.norm(w.reshape(w.shape[0], -1), axis=1).reshape(w.shape[0], *rest)
    if axis == "in":
        n = np.linalg.norm(np.swapaxes(w, 0, 1).reshape(w.shape[1], -1), axis=1)
        return n.reshape(1, w.shape[1], *rest[1:]) if w.ndim > 1 else n
    msg = f"DoRA axis must be 'out' or 'in', not {axis!r}"
    raise ValueError(msg)


def _broadcast_magnitude(magnitude: np.ndarray, weight_shape: tuple[int, ...], axis: str) -> np.ndarray:
    import numpy as np
    m = np.asarray(magnitude, dtype=np.float32).reshape(-1)
    n = weight_shape[0] if axis == "out" else weight_shape[1]
    if m.size != n:
        msg = f"DoRA magnitude has {m.size} values, the weight {tuple(weight_shape)} has {n} on the {axis} axis"
        raise ValueError(msg)
    rest = (1,) * (len(weight_shape) - 1)
    return m.reshape(n, *rest) if axis == "out" else m.reshape(1, n, *rest[1:])


def apply_dora(base: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, axis: str = "out") -> np.ndarray:
    """The DoRA-patched weight ``m · (W + ΔW) / ‖W + ΔW‖`` in float32 (norm per `axis`, see module doc).

    `magnitude` may have any of the producers' shapes ((out,), (out,1), (1,out,1,1), (1,in), ...); only its
    values and `axis` matter. `delta` is the algorithm's ΔW at strength 1 (scale included).
    """
    import numpy as np
    w = np.asarray(base, dtype=np.float32) + np.asarray(delta, dtype=np.float32).reshape(np.shape(base))
    m = _broadcast_magnitude(magnitude, w.shape, axis)
    return (w * (m / (weight_norm(w, axis) + _EPS))).astype(np.float32, copy=False)


def initial_magnitude(base: np.ndarray, axis: str = "out") -> np.ndarray:
    """The magnitude DoRA starts from (‖W‖ on `axis`), in canonical shape."""
    return weight_norm(base, axis)


def canonical_magnitude_shape(n: int, axis: str, weight_ndim: int) -> tuple[int, ...]:
    """kohya/LyCORIS shape of a magnitude: (n, 1[, 1, 1]) on the output axis, (1, n[, 1, 1]) on the input axis."""
    rest = (1,) * max(weight_ndim - 2, 0)
    return (n, 1, *rest) if axis == "out" else (1, n, *rest)


def peft_magnitude_shape(n: int, weight_ndim: int) -> tuple[int, ...]:
    """PEFT ``lora_magnitude_vector`` shape: (out,) for Linear, (1, out, 1, 1) for Conv2d."""
    return (n,) if weight_ndim <= 2 else (1, n, *(1,) * (weight_ndim - 2))


def adopt_peft_magnitude(module) -> None:
    """For layouts holding PEFT magnitudes (``lora_magnitude_vector``): mark the module's DoRA axis as the output
    axis and give the magnitude its canonical shape (same bytes). No-op without a magnitude."""
    if module.dora_scale is None:
        return
    module.dora_axis = "out"
    up = module.tensors.get("up")
    ndim = len(up.shape) if up is not None else 2
    mag = module.dora_scale
    module.dora_scale = mag.reshape(canonical_magnitude_shape(mag.numel, "out", ndim))
