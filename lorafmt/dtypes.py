"""safetensors dtype names, their sizes, and exact numpy conversions (bf16 included, without torch)."""

from __future__ import annotations

import math
import struct

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command
if TYPE_CHECKING:  # numpy is imported on first use: header-only commands never load it
    import numpy as np

__all__ = [
    "DTYPE_SIZES",
    "FLOAT_DTYPES",
    "to_float32",
    "from_float32",
    "numpy_dtype",
    "CLI_DTYPES",
    "float32_round",
    "encode_float32_scalar",
]

# Bytes per element for every dtype the safetensors format defines. Sub-byte types are not
# accepted (no LoRA uses them); an unknown dtype is a header error.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"})

# User-facing names (CLI --dtype) -> safetensors names.
CLI_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "float16": "F16", "bfloat16": "BF16", "float32": "F32"}

_NUMPY = {
    "BOOL": "?",
    "U8": "u1",
    "I8": "i1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "I64": "<i8",
    "U64": "<u8",
    "F64": "<f8",
}


def numpy_dtype(dtype: str) -> np.dtype:
    """The little-endian numpy dtype that holds `dtype` exactly (bf16 and fp8 as raw unsigned ints)."""
    import numpy as np

    if dtype == "BF16":
        return np.dtype("<u2")
    if dtype in ("F8_E5M2", "F8_E4M3"):
        return np.dtype("u1")
    return np.dtype(_NUMPY[dtype])


def _fp8_table(dtype: str) -> np.ndarray:
    import numpy as np

    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    if dtype == "F8_E4M3":  # e4m3fn: bias 7, no infinities, 0x7f/0xff are NaN
        exp = (codes >> 3) & 0xF
        man = codes & 0x7
        val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp.astype(np.float64) - 7))
        val = np.where((codes & 0x7F) == 0x7F, np.nan, val)
    else:  # e5m2: bias 15, IEEE-like
        exp = (codes >> 2) & 0x1F
        man = codes & 0x3
        val = np.where(exp == 0, man / 4.0 * 2.0**-14, (1 + man / 4.0) * 2.0 ** (exp.astype(np.float64) - 15))
        val = np.where(exp == 0x1F, np.where(man == 0, np.inf, np.nan), val)
    return (sign * val).astype(np.float32)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Decode an array read with :func:`numpy_dtype` into float32 (exact for every float dtype but F64)."""
    import numpy as np

    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F8_E5M2", "F8_E4M3"):
        return _fp8_table(dtype)[raw]
    return raw.astype(np.float32)


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Encode float32 values as `dtype` (round to nearest even), ready for ``tobytes()``."""
    import numpy as np

    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "BF16":
        bits = values.view(np.uint32).astype(np.uint64)
        nan = np.isnan(values)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = rounded.astype(np.uint16)
        out[nan] = 0x7FC0
        return out
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype("<f2")
    if dtype == "F32":
        return values.astype("<f4")
    if dtype == "F64":
        return values.astype("<f8")
    msg = f"cannot encode float values as {dtype}"
    raise ValueError(msg)


# ------------------------------------------------------------------------------------ scalars without numpy


def float32_round(value: float) -> float | None:
    """`value` rounded to float32 (as a Python float), or None when a finite value overflows float32."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return None


def encode_float32_scalar(value: float, dtype: str) -> bytes | None:
    """One float32 value encoded as `dtype` exactly as :func:`from_float32` would (round to nearest even,
    overflow to infinity), with the standard library only; None for dtypes it does not cover (fp8, integers).

    Scalars (alphas) are the only tensors a rename-only conversion computes: encoding them this way keeps
    numpy out of the process.

    Example:
        >>> encode_float32_scalar(8.0, "BF16").hex(), encode_float32_scalar(8.0, "F16").hex()
        ('0041', '0048')
    """
    if dtype == "F32":
        return struct.pack("<f", value)
    if dtype == "F64":
        return struct.pack("<d", value)
    if dtype == "F16":
        try:
            return struct.pack("<e", value)
        except OverflowError:
            return struct.pack("<e", math.copysign(math.inf, value))
    if dtype == "BF16":
        if math.isnan(value):
            return struct.pack("<H", 0x7FC0)
        (bits,) = struct.unpack("<I", struct.pack("<f", value))
        return struct.pack("<H", ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)
    return None
