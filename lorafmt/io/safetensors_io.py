"""Header-first safetensors reading and streaming writing, in pure Python (no torch).

The format: 8 bytes little-endian header length N, N bytes of JSON (``{key: {dtype, shape, data_offsets}}``
plus an optional ``__metadata__`` string map), then the data buffer that the offsets index into.
Every check a hostile or broken file could fail is made here, before anything trusts the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafmt.dtypes import DTYPE_SIZES, numpy_dtype, to_float32
from lorafmt.errors import (
    GitLfsPointerError,
    HeaderError,
    NotSafetensorsError,
    PickleFileError,
    SourceError,
    TruncatedFileError,
)
from lorafmt.io.atomic import atomic_output

__all__ = ["Header", "TensorInfo", "read_header", "write_safetensors", "WriteEntry", "sniff_container"]

# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: absolute offsets into the file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    """A parsed safetensors header: tensors by key (in file order), metadata, and the file's geometry."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    _fd_cache: dict = field(default_factory=dict, repr=False)

    def read_bytes(self, key: str) -> bytes:
        info = self.tensors[key]
        with open(self.path, "rb") as fh:
            fh.seek(info.start)
            data = fh.read(info.nbytes)
        if len(data) != info.nbytes:
            msg = f"file changed or truncated while reading: expected {info.nbytes} bytes, got {len(data)}"
            raise TruncatedFileError(msg, file=self.path, key=key)
        return data

    def read_raw(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        arr = np.frombuffer(self.read_bytes(key), dtype=numpy_dtype(info.dtype))
        return arr.reshape(info.shape)

    def read_float32(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        return to_float32(self.read_raw(key), info.dtype)


def sniff_container(path: str, head: bytes, size: int) -> None:
    """Raise a precise error for files that are not safetensors: pickles, zips, git-lfs pointers, HTML."""
    if head.startswith(b"version https://git-lfs"):
        msg = "this is a git-lfs pointer file, not the weights; fetch the real file with `git lfs pull`"
        raise GitLfsPointerError(msg, file=path)
    if head.startswith(b"PK\x03\x04"):
        msg = "this is a zip archive (a torch .pt/.ckpt/.bin checkpoint saved with torch.save), not safetensors"
        raise PickleFileError(msg, file=path, hint="pass --allow-pickle to load it with torch.load(weights_only=True)")
    # A safetensors header length can start with the same two bytes as a pickle (0x80 0x02 = 640 bytes);
    # a real safetensors file then has its JSON object starting at byte 8.
    looks_safetensors = len(head) > 8 and head[8:9] == b"{"
    if not looks_safetensors and len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5):
        msg = "this is a Python pickle (a legacy torch checkpoint), not safetensors"
        raise PickleFileError(msg, file=path, hint="pass --allow-pickle to load it with torch.load(weights_only=True)")
    lowered = head[:64].lstrip().lower()
    if lowered.startswith((b"<!doctype", b"<html", b"<?xml")):
        msg = "this is an HTML/XML page (a failed download?), not safetensors"
        raise NotSafetensorsError(msg, file=path)


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check the header of a safetensors file without reading tensor data.

    Example:
        >>> h = read_header("fixtures/generated/kohya_sd15.safetensors")  # doctest: +SKIP
        >>> sorted(h.tensors)[:1]  # doctest: +SKIP
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(64)
            if len(head) < 8:
                sniff_container(path, head, size)
                msg = f"file is {len(head)} bytes long; a safetensors file has at least 8"
                raise TruncatedFileError(msg, file=path)
            sniff_container(path, head, size)
            (n,) = struct.unpack("<Q", head[:8])
            if n > MAX_HEADER_BYTES:
                if n > size:
                    msg = f"not a safetensors file: header length {n} exceeds the file size {size}"
                    raise NotSafetensorsError(msg, file=path)
                msg = f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"
                raise HeaderError(msg, file=path)
            if 8 + n > size:
                msg = f"header needs {8 + n} bytes but the file has {size}: {8 + n - size} bytes missing"
                raise TruncatedFileError(msg, file=path)
            fh.seek(8)
            raw = fh.read(n)
    except FileNotFoundError:
        msg = "no such file"
        raise SourceError(msg, file=path) from None
    except IsADirectoryError:
        msg = "is a directory, expected a .safetensors file"
        raise SourceError(msg, file=path) from None
    except PermissionError:
        msg = "permission denied"
        raise SourceError(msg, file=path) from None
    return parse_header(path, raw, data_start=8 + n, file_size=size)


def parse_header(path: str, raw: bytes, *, data_start: int, file_size: int) -> Header:
    """Check header JSON bytes against the safetensors rules and the file's size."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"header is not UTF-8 (byte {exc.start})"
        raise HeaderError(msg, file=path) from None
    if not text.lstrip().startswith("{"):
        msg = "header is not a JSON object"
        raise NotSafetensorsError(msg, file=path)
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        msg = f"header is not valid JSON: {exc}"
        raise HeaderError(msg, file=path) from None
    if not isinstance(obj, dict):
        msg = "header is not a JSON object"
        raise HeaderError(msg, file=path)

    metadata: dict[str, str] = {}
    meta = obj.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict):
            msg = "__metadata__ is not an object of strings"
            raise HeaderError(msg, file=path, key="__metadata__")
        for k, v in meta.items():
            if not isinstance(v, str):
                msg = f"metadata value of {k!r} is {type(v).__name__}, safetensors metadata must be strings"
                raise HeaderError(msg, file=path, key=f"__metadata__.{k}")
            metadata[k] = v

    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in obj.items():
        if not isinstance(entry, dict):
            msg = "tensor entry is not an object"
            raise HeaderError(msg, file=path, key=key)
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            msg = f"unknown dtype {dtype!r}"
            raise HeaderError(msg, file=path, key=key)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            msg = f"shape {shape!r} is not a list of non-negative integers"
            raise HeaderError(msg, file=path, key=key)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            msg = f"data_offsets {offsets!r} is not a [begin, end] pair"
            raise HeaderError(msg, file=path, key=key)
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            msg = f"shape {shape} x {dtype} needs {expected} bytes but data_offsets span {end - begin}"
            raise HeaderError(msg, file=path, key=key)
        if end > data_len:
            missing = end - data_len
            msg = f"tensor data ends {missing} bytes past the end of the file (truncated: {missing} bytes missing)"
            raise TruncatedFileError(msg, file=path, key=key)
        tensors[key] = TensorInfo(key, dtype, tuple(shape), data_start + begin, data_start + end)
        spans.append((begin, end, key))

    spans.sort()
    prev_end, prev_key = 0, None
    for begin, end, key in spans:
        if begin < prev_end:
            msg = f"data overlaps tensor {prev_key!r}"
            raise HeaderError(msg, file=path, key=key)
        prev_end, prev_key = end, key
    return Header(path=path, tensors=tensors, metadata=metadata, data_start=data_start, file_size=file_size)


def _reject_constant(name: str) -> None:
    msg = f"non-standard JSON constant {name}"
    raise ValueError(msg)


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class WriteEntry:
    """One output tensor: either bytes copied from a file range, or bytes in memory."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | None = None
    src_path: str | None = None
    src_offset: int = 0
    nbytes: int = 0

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.nbytes


def build_header(entries: list[WriteEntry], metadata: Mapping[str, str] | None) -> bytes:
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for e in entries:
        expected = math.prod(e.shape) * DTYPE_SIZES[e.dtype]
        if e.size != expected:
            msg = f"internal error: {e.key} has {e.size} bytes, shape {e.shape} {e.dtype} needs {expected}"
            raise AssertionError(msg)
        obj[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.size]}
        offset += e.size
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data buffer to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_entries(fh, entries: Iterable[WriteEntry]) -> None:
    """Write tensor bytes; file ranges are copied kernel-side where the OS allows."""
    out_fd = fh.fileno()
    open_sources: dict[str, int] = {}
    try:
        for e in entries:
            if e.data is not None:
                fh.write(e.data)
                continue
            fh.flush()
            src = open_sources.get(e.src_path)
            if src is None:
                src = os.open(e.src_path, os.O_RDONLY)
                open_sources[e.src_path] = src
            _copy_range(src, out_fd, e.src_offset, e.nbytes, e)
    finally:
        for fd in open_sources.values():
            os.close(fd)


def _copy_range(src: int, dst: int, offset: int, count: int, entry: WriteEntry) -> None:
    remaining, pos = count, offset
    copy = getattr(os, "copy_file_range", None)
    while remaining > 0:
        n = 0
        if copy is not None:
            try:
                n = copy(src, dst, remaining, pos)
            except OSError:
                copy = None
                continue
        else:
            chunk = os.pread(src, min(remaining, 1 << 24), pos)
            n = os.write(dst, chunk) if chunk else 0
            if n != len(chunk):
                os.lseek(dst, n - len(chunk), os.SEEK_CUR)
        if n <= 0:
            msg = f"source ended early: {remaining} bytes missing"
            raise TruncatedFileError(msg, file=entry.src_path, key=entry.key)
        remaining -= n
        pos += n


def write_safetensors(
    path: str | os.PathLike, entries: list[WriteEntry], metadata: Mapping[str, str] | None = None, *, force: bool = True
) -> None:
    """Write a safetensors file atomically (temp file in the same folder, fsync, rename).

    Keys are written in sorted order so the output does not depend on input order.
    """
    entries = sorted(entries, key=lambda e: e.key)
    header = build_header(entries, metadata)
    with atomic_output(Path(path), force=force) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            write_entries(fh, entries)
            fh.flush()
            os.fsync(fh.fileno())
