"""Norm (LyCORIS ``norm``): additive deltas of a LayerNorm/GroupNorm's affine parameters, ``w_norm`` (weight)
and optional ``b_norm`` (bias). ΔW is ``w_norm`` (shape (dim,)); Δbias is ``b_norm``.

Example:
    >>> import numpy as np
    >>> from lorafmt.schema import Module, TensorRef
    >>> m = Module(path="unet.n", algorithm="norm", tensors={"w_norm": TensorRef.from_array("w", np.ones(4)),
    ...                                                      "b_norm": TensorRef.from_array("b", np.zeros(4))})
    >>> ALGORITHM.apply(m, np.ones(4, np.float32)).tolist()
    [2.0, 2.0, 2.0, 2.0]
"""

from __future__ import annotations


from lorafmt.algorithms._base import Algorithm

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    import numpy as np

    from lorafmt.schema import Module


class Norm(Algorithm):
    name = "norm"
    param_names = {"w_norm": "w_norm", "b_norm": "b_norm"}
    required = frozenset({"w_norm"})
    detect_param = frozenset({"w_norm"})

    def delta(self, module: Module, base_shape: tuple[int, ...] | None = None) -> np.ndarray:
        import numpy as np
        dw = module.tensors["w_norm"].float32() * np.float32(module.scale)
        if base_shape is not None and tuple(dw.shape) != tuple(base_shape):
            dw = dw.reshape(base_shape)
        return dw.astype(np.float32, copy=False)

    def bias_delta(self, module: Module) -> np.ndarray | None:
        import numpy as np
        ref = module.tensors.get("b_norm")
        return None if ref is None else ref.float32() * np.float32(module.scale)

    def weight_shape(self, module: Module) -> tuple[int, ...] | None:
        return tuple(module.tensors["w_norm"].shape)


ALGORITHM = Norm()
