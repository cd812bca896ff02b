"""IA³ (LyCORIS ``ia3``): a learned per-channel gain. ``W' = W ⊙ (1 + weight)`` along the output rows
(``on_input = 0``) or the input columns (``on_input = 1``) (L ``modules/ia3.py`` · ``_ia3_weight``; A1111
``network_ia3.py`` computes the same delta ``W ⊙ weight``).

The weight change depends on the base weight, so :meth:`IA3.delta` refuses; use :meth:`Algorithm.apply`.

Example:
    >>> import numpy as np
    >>> from lorafmt.schema import Module, TensorRef
    >>> m = Module(path="unet.x", algorithm="ia3", tensors={
    ...     "weight": TensorRef.from_array("w", np.array([1.0, 0.0])),
    ...     "on_input": TensorRef.from_array("o", np.array(0), "I64")})
    >>> ALGORITHM.apply(m, np.ones((2, 3), np.float32)).tolist()
    [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]
"""

from __future__ import annotations


from lorafmt.algorithms._base import Algorithm

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    import numpy as np

    from lorafmt.schema import Module


class IA3(Algorithm):
    name = "ia3"
    param_names = {"weight": "weight", "on_input": "on_input"}
    required = frozenset({"weight"})
    detect_param = frozenset({"on_input"})
    needs_base = True

    @staticmethod
    def on_input(module: Module) -> bool:
        import numpy as np
        ref = module.tensors.get("on_input")
        return bool(ref is not None and np.asarray(ref.raw()).reshape(-1)[0])

    def delta(self, module: Module, base_shape: tuple[int, ...] | None = None) -> np.ndarray:
        raise self._needs_base_error(module)

    def _apply_base(self, module: Module, base: np.ndarray) -> np.ndarray:
        import numpy as np
        gain = module.tensors["weight"].float32().reshape(-1) * np.float32(module.scale)
        rest = (1,) * (base.ndim - 1)
        if self.on_input(module):
            gain = gain.reshape(1, gain.size, *rest[1:])
        else:
            gain = gain.reshape(gain.size, *rest)
        return base + base * gain

    def weight_shape(self, module: Module) -> tuple[int, ...] | None:
        return None  # only one of the two dimensions is known

    def check(self, module: Module) -> list[str]:
        problems = super().check(module)
        if not problems and module.tensors["weight"].numel < 1:
            problems.append("IA3 weight is empty")
        return problems


ALGORITHM = IA3()
