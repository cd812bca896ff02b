"""LoHa (LyCORIS ``loha``): ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b).

Shapes (L ``modules/loha.py``): plain ``hada_w*_a (out, r)``, ``hada_w*_b (r, in·kh·kw)`` (conv kernels are
flattened into ``*_b``); Tucker (conv with a k×k kernel and ``use_tucker``) ``hada_t* (r, r, kh, kw)`` with
**transposed** ``hada_w*_a (r, out)``, ``hada_w*_b (r, in)``. Rank for the scale: ``hada_w1_b.shape[0]``
(ComfyUI, A1111, InvokeAI). PEFT's ``LoHaConfig`` saves the same names under ``base_model.model.``.

Example:
    >>> import numpy as np
    >>> from lorafmt.schema import Module, TensorRef
    >>> t = {r: TensorRef.from_array(r, np.ones(s)) for r, s in
    ...      {"w1_a": (3, 2), "w1_b": (2, 4), "w2_a": (3, 2), "w2_b": (2, 4)}.items()}
    >>> m = Module(path="unet.x", algorithm="loha", tensors=t, alpha=1.0)
    >>> float(ALGORITHM.delta(m)[0, 0]), ALGORITHM.weight_shape(m)   # (2 * 2) * 1/2
    (2.0, (3, 4))
"""

from __future__ import annotations

import math

from lorafmt.algorithms._base import Algorithm

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    import numpy as np

    from lorafmt.schema import Module


def rebuild_tucker(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """LyCORIS ``rebuild_tucker``: ``einsum("i j ..., i p, j r -> p r ...", t, wa, wb)`` (wa (r, out), wb (r, in))."""
    import numpy as np
    return np.einsum("ij...,ip,jr->pr...", t, wa, wb)


class LoHa(Algorithm):
    name = "loha"
    param_names = {
        "w1_a": "hada_w1_a",
        "w1_b": "hada_w1_b",
        "w2_a": "hada_w2_a",
        "w2_b": "hada_w2_b",
        "t1": "hada_t1",
        "t2": "hada_t2",
    }
    required = frozenset({"w1_a", "w1_b", "w2_a", "w2_b"})
    detect_param = frozenset({"hada_w1_a", "hada_w1_b"})

    def rank(self, module: Module) -> int | None:
        w1_b = module.tensors.get("w1_b")
        return w1_b.shape[0] if w1_b is not None and w1_b.shape else None

    @staticmethod
    def tucker(module: Module) -> bool:
        return "t1" in module.tensors

    def delta(self, module: Module, base_shape: tuple[int, ...] | None = None) -> np.ndarray:
        import numpy as np
        t = {k: v.float32() for k, v in module.tensors.items()}
        if "t1" in t:
            dw = rebuild_tucker(t["t1"], t["w1_a"], t["w1_b"]) * rebuild_tucker(t["t2"], t["w2_a"], t["w2_b"])
        else:
            w1 = t["w1_a"].reshape(t["w1_a"].shape[0], -1) @ t["w1_b"].reshape(t["w1_b"].shape[0], -1)
            w2 = t["w2_a"].reshape(t["w2_a"].shape[0], -1) @ t["w2_b"].reshape(t["w2_b"].shape[0], -1)
            dw = w1 * w2
        dw = dw * np.float32(module.scale)
        if base_shape is not None and tuple(dw.shape) != tuple(base_shape):
            dw = dw.reshape(base_shape)
        return dw.astype(np.float32, copy=False)

    def weight_shape(self, module: Module) -> tuple[int, ...] | None:
        """(out, in) — for plain conv factors (out, in·kh·kw), the kernel being flattened into ``hada_w*_b``."""
        t = module.tensors
        if "t1" in t:
            return (t["w1_a"].shape[1], t["w1_b"].shape[1], *t["t1"].shape[2:])
        return (t["w1_a"].shape[0], math.prod(t["w1_b"].shape[1:]))

    def check(self, module: Module) -> list[str]:
        problems = super().check(module)
        if problems:
            return problems
        t = module.tensors
        shapes = {r: t[r].shape for r in t}
        if any(len(s) != 2 for r, s in shapes.items() if r.startswith("w")):
            return [f"LoHa factors must be matrices, got {shapes}"]
        if ("t1" in t) != ("t2" in t):
            return ["Tucker LoHa needs both hada_t1 and hada_t2"]
        if "t1" in t:
            r = shapes["t1"][0]
            ok = all(shapes[k][0] == r for k in ("w1_a", "w1_b", "w2_a", "w2_b")) and shapes["w1_a"] == shapes["w2_a"]
            ok = ok and shapes["w1_b"] == shapes["w2_b"] and shapes["t1"] == shapes["t2"]
        else:
            ok = shapes["w1_a"][1] == shapes["w1_b"][0] and shapes["w2_a"][1] == shapes["w2_b"][0]
            ok = ok and shapes["w1_a"][0] == shapes["w2_a"][0] and shapes["w1_b"][1] == shapes["w2_b"][1]
        return [] if ok else [f"LoHa factor shapes do not fit together: {shapes}"]


ALGORITHM = LoHa()
