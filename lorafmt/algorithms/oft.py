"""OFT: orthogonal fine-tuning — the weight's output rows are rotated block-wise.

* **Diag-OFT** (LyCORIS ``diag-oft``, kohya ``networks.oft``): ``oft_blocks (k, n, n)``; ``Q = B − Bᵀ``, scaled
  down to ``‖Q‖ = constraint`` when larger, ``R = (I + Q)(I − Q)⁻¹``; ``W'[block k] = R_kᵀ · W[block k]``
  (einsum ``"k n m, k n ... -> k m ..."``), then ``W' *= rescale`` when present. The stored ``alpha`` is the
  raw constraint; the effective one is ``alpha · out_dim`` (L ``DiagOFTModule``: ``constraint * out_dim``;
  K ``OFTModule``: "alpha * out_dim"); ``alpha`` 0 or absent means unconstrained.
* **Old LyCORIS** ``oft_diag``: the block rotations ``R`` themselves, applied the same way (A1111 ``network_oft``).
* **BOFT** (LyCORIS ``boft``, algorithm id ``boft``): ``oft_blocks (m, k, n, n)`` — m butterfly stages, each
  a block-diagonal rotation ``R @ W`` on a permuted view (L ``functional/boft.py`` · ``_diff_weight``).

The effect depends on the base weight: :meth:`delta` refuses; use :meth:`Algorithm.apply`. ``alpha`` here is a
constraint, not a scale: ``rank`` is None so ``Module.scale`` stays 1.

Example:
    >>> import numpy as np
    >>> from lorafmt.schema import Module, TensorRef
    >>> m = Module(path="unet.x", algorithm="oft", tensors={"blocks": TensorRef.from_array("b", np.zeros((2, 2, 2)))})
    >>> ALGORITHM.apply(m, np.eye(4, dtype=np.float32)).tolist() == np.eye(4).tolist()   # B = 0: R = I
    True
"""

from __future__ import annotations


from lorafmt.algorithms._base import Algorithm

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    import numpy as np

    from lorafmt.schema import Module


def cayley(blocks: np.ndarray, constraint: float | None) -> np.ndarray:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ (last two axes), Q's norm capped at `constraint` (LyCORIS ``get_r``)."""
    import numpy as np
    b = np.asarray(blocks, dtype=np.float64)
    q = b - np.swapaxes(b, -1, -2)
    if constraint is not None and constraint > 0:
        q_norm = float(np.linalg.norm(q)) + 1e-8
        if q_norm > constraint:
            q = q * (constraint / q_norm)
    eye = np.eye(b.shape[-1])
    return ((eye + q) @ np.linalg.inv(eye - q)).astype(np.float32)


class OFT(Algorithm):
    name = "oft"
    param_names = {"blocks": "oft_blocks", "diag": "oft_diag", "rescale": "rescale"}
    required = frozenset()
    detect_param = frozenset({"oft_blocks", "oft_diag"})
    needs_base = True
    zero_alpha_ok = True
    priority = 1

    def classify(self, tensors: dict) -> str:
        blocks = tensors.get("blocks")
        return "boft" if blocks is not None and len(blocks.shape) == 4 else "oft"

    def constraint(self, module: Module, out_dim: int) -> float | None:
        return None if not module.alpha else float(module.alpha) * out_dim

    def rotations(self, module: Module, out_dim: int) -> np.ndarray:
        """The block rotations R (float32): (k, n, n) for OFT, (m, k, n, n) for BOFT."""
        if "diag" in module.tensors:
            return module.tensors["diag"].float32()
        return cayley(module.tensors["blocks"].float32(), self.constraint(module, out_dim))

    def delta(self, module: Module, base_shape: tuple[int, ...] | None = None) -> np.ndarray:
        raise self._needs_base_error(module)

    def _apply_base(self, module: Module, base: np.ndarray) -> np.ndarray:
        import numpy as np
        out_dim, *rest = base.shape
        r = self.rotations(module, out_dim)
        if r.ndim == 4:
            new = _butterfly(r, base)
        else:
            k, n, _ = r.shape
            if k * n != out_dim:
                msg = f"OFT blocks {r.shape} do not cover {out_dim} output rows"
                raise ValueError(msg)
            new = np.einsum("knm,kn...->km...", r, base.reshape(k, n, *rest)).reshape(base.shape)
        if "rescale" in module.tensors:
            new = new * module.tensors["rescale"].float32().reshape(out_dim, *(1,) * len(rest))
        return new.astype(np.float32, copy=False)

    def weight_shape(self, module: Module) -> tuple[int, ...] | None:
        return None  # only the output dimension is known

    def out_features(self, module: Module) -> int | None:
        ref = module.tensors.get("blocks") or module.tensors.get("diag")
        if ref is None:
            return None
        s = ref.shape
        return s[-3] * s[-1] if len(s) >= 3 else None

    def check(self, module: Module) -> list[str]:
        t = module.tensors
        if "blocks" not in t and "diag" not in t:
            return ["missing 'blocks' tensor (oft_blocks or oft_diag)"]
        ref = t.get("blocks") or t.get("diag")
        if len(ref.shape) not in (3, 4) or ref.shape[-1] != ref.shape[-2]:
            return [f"OFT blocks must be (k, n, n) or (m, k, n, n), got {ref.shape}"]
        return []


def _butterfly(r: np.ndarray, base: np.ndarray) -> np.ndarray:
    """LyCORIS ``functional/boft.py`` · ``_diff_weight`` without the final subtraction."""
    import numpy as np
    m, _, b, _ = r.shape
    rest = base.shape[1:]
    half = b // 2
    inp = base.astype(np.float32)
    for i in range(m):
        k = 2**i * half
        inp = inp.reshape(-1, 2, k, *rest).swapaxes(1, 2).reshape(-1, b, *rest)
        inp = np.einsum("bij,bj...->bi...", r[i], inp)
        inp = inp.reshape(-1, k, 2, *rest).swapaxes(1, 2).reshape(-1, *rest)
    return inp


class BOFT(OFT):
    name = "boft"
    detect_param = frozenset()
    priority = 0


ALGORITHM = OFT()
