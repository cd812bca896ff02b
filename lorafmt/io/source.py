"""Sources: what a layout reads from — one safetensors file, a folder of them (PEFT), or an in-memory dict.

Building a source reads headers only; tensors stay lazy :class:`~lorafmt.schema.TensorRef` s.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator
from lorafmt._record import Factory, Record

from lorafmt.errors import HeaderError, PickleFileError, SourceError
from lorafmt.io.safetensors_io import read_header
from lorafmt.schema import TensorRef

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command
if TYPE_CHECKING:
    from typing import Any, Literal

__all__ = ["Source", "open_source", "source_from_mapping", "pickle_loading"]

# Sidecar files a folder source keeps (PEFT configs and similar); anything bigger is ignored.
_SIDECAR_MAX_BYTES = 4_000_000


class Source(Record):
    """Header-level view of an input.

    Attributes:
        path: where it came from (None for in-memory dicts).
        kind: ``file``, ``dir`` or ``dict``.
        tensors: raw key -> lazy tensor (file and dict kinds).
        metadata: the safetensors ``__metadata__`` map.
        parts: for folders, relative path of each safetensors file -> its Source.
        sidecars: for folders, relative path -> bytes of small JSON files next to the weights.
    """

    path: str | None
    kind: Literal["file", "dir", "dict"]
    tensors: dict[str, TensorRef] = Factory(dict)
    metadata: dict[str, str] = Factory(dict)
    parts: dict[str, Source] = Factory(dict)
    sidecars: dict[str, bytes] = Factory(dict)

    @property
    def name(self) -> str:
        return self.path or "<in-memory state dict>"

    def all_keys(self) -> list[str]:
        if self.kind == "dir":
            return [f"{rel}::{k}" for rel, part in self.parts.items() for k in part.tensors]
        return list(self.tensors)

    def read_scalar(self, key: str) -> float:
        """The value of a 0-d or 1-element tensor (alpha), as a float."""
        ref = self.tensors[key]
        if ref.numel != 1:
            msg = f"expected a scalar, found shape {list(ref.shape)}"
            raise HeaderError(msg, file=self.path, key=key)
        return ref.scalar()

    def sidecar_json(self, rel: str) -> Any:
        raw = self.sidecars[rel]
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            msg = f"{rel} is not valid JSON: {exc}"
            raise SourceError(msg, file=os.path.join(self.path or "", rel)) from None


def _file_source(path: str) -> Source:
    def lazy_tensor(key: str, dtype: str, shape: tuple[int, ...], start: int, end: int) -> TensorRef:
        return TensorRef(key=key, dtype=dtype, shape=shape, file=path, offset=start)

    header = read_header(path, make=lazy_tensor)
    return Source(path=path, kind="file", tensors=header.tensors, metadata=dict(header.metadata))


def _dir_source(path: str) -> Source:
    from pathlib import Path  # folders only (PEFT adapters)

    root = Path(path)
    parts: dict[str, Source] = {}
    sidecars: dict[str, bytes] = {}
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root).as_posix()
        if rel.count("/") > 2 or any(p.startswith(".") for p in rel.split("/")) or not file.is_file():
            continue
        if file.suffix == ".safetensors":
            parts[rel] = _file_source(str(file))
        elif file.suffix == ".json" and file.stat().st_size <= _SIDECAR_MAX_BYTES:
            sidecars[rel] = file.read_bytes()
    if not parts:
        msg = "folder holds no .safetensors file"
        raise SourceError(msg, file=path)
    return Source(path=path, kind="dir", parts=parts, sidecars=sidecars)


def source_from_mapping(mapping: Any, metadata: dict[str, str] | None = None, name: str | None = None) -> Source:
    """Wrap a ``{key: array}`` state dict (numpy arrays, or torch tensors converted without copying when possible)."""
    tensors: dict[str, TensorRef] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            msg = f"state dict keys must be strings, found {type(key).__name__}"
            raise SourceError(msg, file=name)
        tensors[key] = _ref_from_value(key, value, name)
    return Source(path=name, kind="dict", tensors=tensors, metadata=dict(metadata or {}))


def _ref_from_value(key: str, value: Any, name: str | None) -> TensorRef:
    if isinstance(value, TensorRef):
        return value.renamed(key)
    import numpy as np

    mod = type(value).__module__
    if mod.startswith("torch"):
        import torch  # only reached when the caller already holds torch tensors

        try:
            t = value.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                raw = t.view(torch.int16).numpy().view(np.uint16)
                return TensorRef.from_raw(key, "BF16", raw)
            fp8 = {getattr(torch, "float8_e4m3fn", None): "F8_E4M3", getattr(torch, "float8_e5m2", None): "F8_E5M2"}
            if t.dtype in fp8:
                return TensorRef.from_raw(key, fp8[t.dtype], t.view(torch.uint8).numpy())
            value = t.numpy()
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
            msg = f"cannot read this torch tensor ({getattr(value, 'dtype', type(value).__name__)}): {exc}"
            raise SourceError(msg, file=name, key=key) from None
    try:
        arr = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - anything not array-like is a user error
        msg = f"value is not an array ({type(value).__name__}): {exc}"
        raise SourceError(msg, file=name, key=key) from None
    if arr.dtype == np.float16:
        return TensorRef.from_raw(key, "F16", arr.astype("<f2"))
    if arr.dtype == np.float64:
        return TensorRef.from_raw(key, "F64", arr.astype("<f8"))
    if arr.dtype.kind == "f":
        return TensorRef.from_raw(key, "F32", arr.astype("<f4"))
    if arr.dtype.kind in "iub":
        table = {"i1": "I8", "i2": "I16", "i4": "I32", "i8": "I64", "u1": "U8", "u2": "U16", "u4": "U32", "u8": "U64", "b1": "BOOL"}
        code = f"{arr.dtype.kind}{arr.dtype.itemsize}"
        if code in table:
            return TensorRef.from_raw(key, table[code], arr.astype(arr.dtype.newbyteorder("<")))
    msg = f"unsupported array dtype {arr.dtype}"
    raise SourceError(msg, file=name, key=key)


# What ``allow_pickle=None`` means: False unless a caller (the CLI's --allow-pickle) opted in for this context.
_ALLOW_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("lorafmt_allow_pickle", default=False)


@contextlib.contextmanager
def pickle_loading(allowed: bool) -> Iterator[None]:
    """Within the block, sources opened with ``allow_pickle=None`` may load pickles (torch weights_only only)."""
    token = _ALLOW_PICKLE.set(bool(allowed))
    try:
        yield
    finally:
        _ALLOW_PICKLE.reset(token)


def open_source(
    src: str | os.PathLike | Any,
    *,
    metadata: dict[str, str] | None = None,
    allow_pickle: bool | None = None,
    header_only: bool = False,
) -> Source:
    """Open a path (file or folder), an ``hf://owner/repo/file[@rev]`` URL, or wrap a state dict, reading headers only.

    Pickle/zip checkpoints are refused with :class:`~lorafmt.errors.PickleFileError` unless `allow_pickle`
    (then they load through ``torch.load(weights_only=True)`` only; see :mod:`lorafmt.io.pickle_io`).

    `header_only`: the caller reads no tensor data besides scalars, so a hub file that is not cached may be read
    with ranged requests instead of downloaded (see :mod:`lorafmt.hub`).
    """
    if isinstance(src, Source):
        return src
    if isinstance(src, str) and src.startswith("hf://"):
        from lorafmt.hub import open_hub_source

        return open_hub_source(src, header_only=header_only)
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if os.path.isdir(path):
            return _dir_source(path)
        try:
            return _file_source(path)
        except PickleFileError:
            if not (_ALLOW_PICKLE.get() if allow_pickle is None else allow_pickle):
                raise
        from lorafmt.io.pickle_io import load_pickle_source

        return load_pickle_source(path)
    if hasattr(src, "items"):
        return source_from_mapping(src, metadata)
    msg = f"cannot read a {type(src).__name__}; pass a path or a {{key: tensor}} mapping"
    raise SourceError(msg)
