"""The algorithm contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import numpy as np

    from lorafmt.schema import Module

__all__ = ["Algorithm", "target_shape_of"]


class Algorithm:
    """One way of parametrising a weight change.

    Attributes:
        name: the algorithm id (``lora``, ``loha``, ...).
        param_names: role -> the parameter name LyCORIS/kohya files use after the module name.
        required: roles that must be present.
        detect_param: parameter names whose presence identifies this algorithm.
        priority: tie-break when several algorithms' detect params match.
    """

    name: ClassVar[str]
    param_names: ClassVar[dict[str, str]]
    required: ClassVar[frozenset[str]]
    detect_param: ClassVar[frozenset[str]] = frozenset()
    priority: ClassVar[int] = 0

    def rank(self, module: Module) -> int | None:
        """The number alpha is divided by, as every loader surveyed computes it."""
        return None

    def delta(self, module: Module, base_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """ΔW in float32, including the module's scale (alpha/rank), shaped like the base weight when known."""
        raise NotImplementedError

    def weight_shape(self, module: Module) -> tuple[int, ...] | None:
        """The base weight shape the tensors imply ((out, in) or (out, in, kh, kw)); None when unknown."""
        return None

    def check(self, module: Module) -> list[str]:
        """Internal consistency problems (missing roles, rank disagreement); empty when fine."""
        missing = sorted(self.required - set(module.tensors))
        return [f"missing {role!r} tensor" for role in missing]


def target_shape_of(module: Module) -> tuple[int, ...] | None:
    """The shape of the base weight a module's tensors imply, or None when they don't say."""
    from lorafmt.algorithms import get_algorithm

    try:
        return get_algorithm(module.algorithm).weight_shape(module)
    except (KeyError, IndexError, ValueError):
        return None
