"""LoRA (incl. LoCon conv factors and Tucker `lora_mid`): ΔW = alpha/rank · up @ [mid] @ down."""

from __future__ import annotations


from lorafmt.algorithms._base import Algorithm

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    import numpy as np

    from lorafmt.schema import Module


def _as_matrix(t: np.ndarray) -> np.ndarray:
    return t.reshape(t.shape[0], -1)


class LoRA(Algorithm):
    name = "lora"
    param_names = {
        "down": "lora_down.weight",
        "up": "lora_up.weight",
        "mid": "lora_mid.weight",
        "bias": "lora_B.bias",
    }
    required = frozenset({"down", "up"})
    detect_param = frozenset({"lora_down.weight", "lora_up.weight"})

    def rank(self, module: Module) -> int | None:
        down = module.tensors.get("down")
        return down.shape[0] if down is not None and down.shape else None

    def delta(self, module: Module, base_shape: tuple[int, ...] | None = None) -> np.ndarray:
        import numpy as np

        down = module.tensors["down"].float32()
        up = module.tensors["up"].float32()
        mid = module.tensors.get("mid")
        if mid is not None:
            # Tucker: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1)
            m = mid.float32()
            dw = np.einsum("ij,jk...,kl->il...", _as_matrix(up), m, _as_matrix(down))
        elif down.ndim == 4 and down.shape[2:] != (1, 1):
            # k×k conv down with 1×1 up: the product flattens over (in, kh, kw) exactly.
            dw = (_as_matrix(up) @ _as_matrix(down)).reshape(up.shape[0], *down.shape[1:])
        else:
            dw = _as_matrix(up) @ _as_matrix(down)
            if down.ndim == 4:
                dw = dw.reshape(dw.shape[0], dw.shape[1], 1, 1)
        dw = dw * np.float32(module.scale)
        if base_shape is not None and tuple(dw.shape) != tuple(base_shape):
            dw = dw.reshape(base_shape)
        return dw.astype(np.float32, copy=False)

    def factors(self, module: Module) -> tuple[np.ndarray, np.ndarray] | None:
        """ΔW as a product U @ D (U: (out, r) with the scale folded in, D: (r, in·kh·kw)), or None for Tucker."""
        import numpy as np

        if "mid" in module.tensors:
            return None
        up = _as_matrix(module.tensors["up"].float32()).astype(np.float64) * module.scale
        down = _as_matrix(module.tensors["down"].float32()).astype(np.float64)
        return up, down

    def weight_shape(self, module: Module) -> tuple[int, ...] | None:
        down, up = module.tensors["down"], module.tensors["up"]
        mid = module.tensors.get("mid")
        kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        if kernel == (1, 1) and len(down.shape) == 4:
            return (up.shape[0], down.shape[1], 1, 1)
        return (up.shape[0], down.shape[1], *kernel)

    def check(self, module: Module) -> list[str]:
        problems = super().check(module)
        down, up = module.tensors.get("down"), module.tensors.get("up")
        if down is not None and up is not None and not problems:
            if len(down.shape) not in (2, 4) or len(up.shape) not in (2, 4):
                problems.append(f"down {down.shape} / up {up.shape} are not 2-D (linear) or 4-D (conv) factors")
            elif len(up.shape) == 4 and tuple(up.shape[2:]) != (1, 1):
                problems.append(f"up {up.shape} is a conv factor with a {up.shape[2]}x{up.shape[3]} kernel; it must be 1x1")
            elif up.shape[1] != down.shape[0]:
                problems.append(f"rank mismatch: down {down.shape} has rank {down.shape[0]}, up {up.shape} has {up.shape[1]}")
            mid = module.tensors.get("mid")
            if mid is not None and (len(mid.shape) != 4 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]):
                problems.append(f"Tucker mid {mid.shape} does not fit down {down.shape} / up {up.shape}")
        return problems


ALGORITHM = LoRA()
