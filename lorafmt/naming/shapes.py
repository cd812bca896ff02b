"""Factor shapes per target framework: the same bytes, reshaped where frameworks disagree."""

from __future__ import annotations

from lorafmt.schema import TensorRef

__all__ = ["linear_factor", "is_linear_projection"]


def is_linear_projection(path: str, family: str | None) -> bool:
    """SD2 and SDXL U-Nets use Linear proj_in/proj_out (SD1 uses 1x1 convs; sd-scripts builds SD2 with convs)."""
    return family in ("sd2", "sdxl") and ".attentions." in path and path.endswith((".proj_in", ".proj_out"))


def linear_factor(ref: TensorRef, path: str, family: str | None) -> TensorRef:
    """PEFT's Linear layers hold 2-D factors; kohya SD2 stores 1x1-conv-shaped ones for Linear projections."""
    if len(ref.shape) == 4 and ref.shape[2:] == (1, 1) and is_linear_projection(path, family):
        return ref.reshape(ref.shape[:2])
    return ref
