"""The algorithm contract.

Stable API used by ``fuse`` and the in-memory apply (keep signatures stable):

* ``Algorithm.delta(module, base_shape=None) -> np.ndarray`` — ΔW in float32 with the module's scale
  (alpha/rank) applied; raises :class:`~lorafmt.errors.UnsupportedFeatureError` for algorithms whose effect
  depends on the base weight (``needs_base``: IA3, OFT, BOFT) — use ``apply`` for those.
* ``Algorithm.apply(module, base_weight, multiplier=1.0) -> np.ndarray`` — the new weight (float32) for a
  given base weight, every algorithm, DoRA included.
* ``Algorithm.bias_delta(module) -> np.ndarray | None`` — Δbias (``full``'s ``diff_b``, ``norm``'s ``b_norm``).

Example:
    >>> import numpy as np
    >>> from lorafmt.algorithms import get_algorithm
    >>> from lorafmt.schema import Module, TensorRef
    >>> m = Module(path="unet.x", tensors={"down": TensorRef.from_array("d", np.ones((1, 2))),
    ...                                    "up": TensorRef.from_array("u", np.ones((3, 1)))})
    >>> get_algorithm("lora").apply(m, np.zeros((3, 2), np.float32)).tolist()
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command


if TYPE_CHECKING:
    from typing import ClassVar
    import numpy as np

    from lorafmt.schema import Module

__all__ = ["Algorithm", "target_shape_of", "as_matrix"]


def as_matrix(t: np.ndarray) -> np.ndarray:
    """Flatten everything after the first axis."""
    return t.reshape(t.shape[0], -1)


class Algorithm:
    """One way of parametrising a weight change.

    Attributes:
        name: the algorithm id (``lora``, ``loha``, ...).
        param_names: role -> the parameter name LyCORIS/kohya files use after the module name.
        required: roles that must be present.
        detect_param: parameter names whose presence identifies this algorithm.
        priority: tie-break when several algorithms' detect params match.
        needs_base: True when the weight change depends on the base weight (IA3, OFT): ``delta`` refuses,
            ``apply`` works.
        zero_alpha_ok: True when alpha is not a scale numerator and 0 is meaningful (OFT's constraint).
    """

    name: ClassVar[str]
    param_names: ClassVar[dict[str, str]]
    required: ClassVar[frozenset[str]]
    detect_param: ClassVar[frozenset[str]] = frozenset()
    priority: ClassVar[int] = 0
    needs_base: ClassVar[bool] = False
    zero_alpha_ok: ClassVar[bool] = False

    def classify(self, tensors: dict) -> str:
        """The algorithm id for these tensors (lets one parameter family cover variants, e.g. OFT/BOFT)."""
        return self.name

    def rank(self, module: Module) -> int | None:
        """The number alpha is divided by, as every loader surveyed computes it."""
        return None

    def delta(self, module: Module, base_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """ΔW in float32, including the module's scale (alpha/rank), shaped like the base weight when known."""
        raise NotImplementedError

    def bias_delta(self, module: Module) -> np.ndarray | None:
        """Δbias in float32 (scale included), or None when the algorithm does not touch the bias."""
        return None

    def apply(self, module: Module, base_weight: np.ndarray, multiplier: float = 1.0) -> np.ndarray:
        """The patched weight for `base_weight` (float32): ``W + multiplier·ΔW``; with a DoRA magnitude,
        ``W + multiplier·(DoRA(W, ΔW) − W)`` (A1111/ComfyUI strength convention, see :mod:`lorafmt.algorithms.dora`).
        """
        import numpy as np
        base = np.asarray(base_weight, dtype=np.float32)
        if self.needs_base:
            new = self._apply_base(module, base)
        else:
            new = base + self.delta(module, tuple(base.shape))
        if module.dora_scale is not None:
            from lorafmt.algorithms.dora import apply_dora

            new = apply_dora(base, new - base, module.dora_scale.float32(), module.dora_axis or "out")
        if multiplier != 1.0:
            new = base + np.float32(multiplier) * (new - base)
        return new.astype(np.float32, copy=False)

    def _apply_base(self, module: Module, base: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def weight_shape(self, module: Module) -> tuple[int, ...] | None:
        """The base weight shape the tensors imply ((out, in) or (out, in, kh, kw)); None when unknown."""
        return None

    def check(self, module: Module) -> list[str]:
        """Internal consistency problems (missing roles, rank disagreement); empty when fine."""
        missing = sorted(self.required - set(module.tensors))
        return [f"missing {role!r} tensor" for role in missing]

    def _needs_base_error(self, module: Module):
        from lorafmt.errors import UnsupportedFeatureError

        msg = f"the {self.name} weight change depends on the base weight; use apply(module, base_weight)"
        return UnsupportedFeatureError(msg, module=module.path)


def target_shape_of(module: Module) -> tuple[int, ...] | None:
    """The shape of the base weight a module's tensors imply, or None when they don't say."""
    from lorafmt.algorithms import get_algorithm

    try:
        return get_algorithm(module.algorithm).weight_shape(module)
    except (KeyError, IndexError, ValueError):
        return None
