"""LoKr (LyCORIS ``kron``): ΔW = scale · kron(w1, w2).

``w1 (a, c)`` is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``w2 (b, d[, kh, kw])`` is ``lokr_w2``, or
``lokr_w2_a (b, r) @ lokr_w2_b (r, d·kh·kw)`` (conv kernel flattened), or Tucker ``rebuild(lokr_t2 (r, r, kh, kw),
lokr_w2_a (r, b), lokr_w2_b (r, d))``; out = a·b, in = c·d (L ``modules/lokr.py``, ``functional/lokr.py``).

Scale: ``alpha / rank`` with rank ``lokr_w2_b.shape[0]``, else ``lokr_w1_b.shape[0]`` (ComfyUI/InvokeAI;
LyCORIS uses one ``lora_dim`` for both). When neither side is factorised ("full-matrix" LoKr) the scale is 1
whatever alpha says — LyCORIS forces ``alpha = lora_dim`` then, and every reader ignores it.

Example:
    >>> import numpy as np
    >>> from lorafmt.schema import Module, TensorRef
    >>> m = Module(path="unet.x", algorithm="lokr", alpha=7.0, tensors={
    ...     "w1": TensorRef.from_array("w1", np.eye(2)), "w2": TensorRef.from_array("w2", np.ones((3, 2)))})
    >>> ALGORITHM.rank(m), m.scale, ALGORITHM.delta(m).shape   # full matrices: scale 1
    (None, 1.0, (6, 4))
"""

from __future__ import annotations

import math

from lorafmt.algorithms._base import Algorithm
from lorafmt.algorithms.loha import rebuild_tucker

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    import numpy as np

    from lorafmt.schema import Module


class LoKr(Algorithm):
    name = "lokr"
    param_names = {
        "w1": "lokr_w1",
        "w1_a": "lokr_w1_a",
        "w1_b": "lokr_w1_b",
        "w2": "lokr_w2",
        "w2_a": "lokr_w2_a",
        "w2_b": "lokr_w2_b",
        "t2": "lokr_t2",
    }
    required = frozenset()
    detect_param = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"})

    def rank(self, module: Module) -> int | None:
        for role in ("w2_b", "w1_b"):
            ref = module.tensors.get(role)
            if ref is not None and ref.shape:
                return ref.shape[0]
        return None

    @staticmethod
    def kron_factors(module: Module) -> tuple[np.ndarray, np.ndarray]:
        """(w1, w2) rebuilt from their factors, float32, scale not applied."""
        t = module.tensors
        w1 = t["w1"].float32() if "w1" in t else t["w1_a"].float32() @ t["w1_b"].float32()
        if "w2" in t:
            w2 = t["w2"].float32()
        elif "t2" in t:
            w2 = rebuild_tucker(t["t2"].float32(), t["w2_a"].float32(), t["w2_b"].float32())
        else:
            a, b = t["w2_a"].float32(), t["w2_b"].float32()
            w2 = a @ b.reshape(b.shape[0], -1)
        return w1, w2

    def delta(self, module: Module, base_shape: tuple[int, ...] | None = None) -> np.ndarray:
        import numpy as np
        w1, w2 = self.kron_factors(module)
        w1 = w1.reshape(*w1.shape, *(1,) * (w2.ndim - w1.ndim))
        dw = np.kron(w1, w2) * np.float32(module.scale)
        if base_shape is not None and tuple(dw.shape) != tuple(base_shape):
            dw = dw.reshape(base_shape)
        return dw.astype(np.float32, copy=False)

    def kron_shapes(self, module: Module) -> tuple[tuple[int, int], tuple[int, ...]]:
        """((a, c), (b, d[, kh, kw])) — the shapes of w1 and w2 (a plain conv w2 reports (b, d·kh·kw))."""
        t = module.tensors
        w1 = tuple(t["w1"].shape) if "w1" in t else (t["w1_a"].shape[0], t["w1_b"].shape[1])
        if "w2" in t:
            w2 = tuple(t["w2"].shape)
        elif "t2" in t:
            w2 = (t["w2_a"].shape[1], t["w2_b"].shape[1], *t["t2"].shape[2:])
        else:
            w2 = (t["w2_a"].shape[0], math.prod(t["w2_b"].shape[1:]))
        return w1, w2

    def weight_shape(self, module: Module) -> tuple[int, ...] | None:
        (a, c), (b, d, *k) = self.kron_shapes(module)
        return (a * b, c * d, *k)

    def check(self, module: Module) -> list[str]:
        t = module.tensors
        problems = []
        if not ("w1" in t or {"w1_a", "w1_b"} <= set(t)):
            problems.append("missing 'w1' tensor (lokr_w1 or lokr_w1_a + lokr_w1_b)")
        if not ("w2" in t or {"w2_a", "w2_b"} <= set(t)):
            problems.append("missing 'w2' tensor (lokr_w2 or lokr_w2_a + lokr_w2_b)")
        if problems:
            return problems
        shapes = {r: tuple(v.shape) for r, v in t.items()}
        if "w1_a" in t and "w1" not in t and shapes["w1_a"][1] != shapes["w1_b"][0]:
            problems.append(f"lokr_w1_a {shapes['w1_a']} / lokr_w1_b {shapes['w1_b']} ranks differ")
        if "w2" not in t:
            if "t2" in t:
                t2 = shapes["t2"]
                if len(t2) < 3 or t2[0] != shapes["w2_a"][0] or t2[1] != shapes["w2_b"][0]:
                    problems.append(f"lokr_t2 {t2} does not fit lokr_w2_a {shapes['w2_a']} / lokr_w2_b {shapes['w2_b']}")
            elif shapes["w2_a"][1] != shapes["w2_b"][0]:
                problems.append(f"lokr_w2_a {shapes['w2_a']} / lokr_w2_b {shapes['w2_b']} ranks differ")
        return problems


ALGORITHM = LoKr()


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS/PEFT ``factorization``: split `dimension` into (m, n), m ≤ n, m as close to `factor` as allowed
    (``factor=-1``: the most balanced split). LoKr's w1 takes m, w2 takes n.

    >>> factorization(128), factorization(128, 4), factorization(250, 8)
    ((8, 16), (4, 32), (5, 50))
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)
