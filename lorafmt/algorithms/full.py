"""Full (LyCORIS ``full``): the weight difference itself, ``diff`` (= trained − original) and optional
``diff_b`` for the bias. No alpha, no scale.

Example:
    >>> import numpy as np
    >>> from lorafmt.schema import Module, TensorRef
    >>> m = Module(path="unet.x", algorithm="full", tensors={"diff": TensorRef.from_array("d", np.ones((2, 3)))})
    >>> float(ALGORITHM.delta(m).sum()), ALGORITHM.weight_shape(m)
    (6.0, (2, 3))
"""

from __future__ import annotations


from lorafmt.algorithms._base import Algorithm

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    import numpy as np

    from lorafmt.schema import Module


class Full(Algorithm):
    name = "full"
    param_names = {"diff": "diff", "diff_b": "diff_b"}
    required = frozenset({"diff"})
    detect_param = frozenset({"diff"})

    def delta(self, module: Module, base_shape: tuple[int, ...] | None = None) -> np.ndarray:
        import numpy as np
        dw = module.tensors["diff"].float32() * np.float32(module.scale)
        if base_shape is not None and tuple(dw.shape) != tuple(base_shape):
            dw = dw.reshape(base_shape)
        return dw.astype(np.float32, copy=False)

    def bias_delta(self, module: Module) -> np.ndarray | None:
        import numpy as np
        ref = module.tensors.get("diff_b")
        return None if ref is None else ref.float32() * np.float32(module.scale)

    def weight_shape(self, module: Module) -> tuple[int, ...] | None:
        return tuple(module.tensors["diff"].shape)


ALGORITHM = Full()
