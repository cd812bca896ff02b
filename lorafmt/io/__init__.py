"""File I/O: safetensors headers, lazy tensor bytes, streaming atomic writes."""

from lorafmt.io.safetensors_io import Header, TensorInfo, read_header, write_safetensors

__all__ = ["Header", "TensorInfo", "read_header", "write_safetensors"]
