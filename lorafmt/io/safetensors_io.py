"""Header-first safetensors reading and streaming writing, in pure Python (no torch).

The format: 8 bytes little-endian header length N, N bytes of JSON (``{key: {dtype, shape, data_offsets}}``
plus an optional ``__metadata__`` string map), then the data buffer that the offsets index into.
Every check a hostile or broken file could fail is made here, before anything trusts the header.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from lorafmt._record import Factory, Record

from lorafmt.dtypes import DTYPE_SIZES, numpy_dtype, to_float32
from lorafmt.errors import (
    BadOffsetsError,
    BadShapeError,
    DuplicateKeyError,
    FileTooShortError,
    GitLfsPointerError,
    HeaderEncodingError,
    HeaderError,
    HeaderJsonError,
    HeaderNotObjectError,
    HeaderTooLargeError,
    HtmlFileError,
    ImplausibleHeaderLengthError,
    LorafmtError,
    MetadataError,
    NotSafetensorsError,
    OutputWriteError,
    OverlappingDataError,
    PickleFileError,
    ShapeMismatchError,
    SourceError,
    TruncatedDataError,
    TruncatedFileError,
    TruncatedHeaderError,
    UnknownDtypeError,
)
from lorafmt.io.atomic import atomic_output, open_output

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:  # numpy is imported on first use: header-only commands never load it
    import numpy as np

__all__ = [
    "Header",
    "TensorInfo",
    "read_header",
    "write_safetensors",
    "WriteEntry",
    "sniff_container",
    "decode_scalar",
    "ScalarReader",
]

# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000


class TensorInfo(Record, frozen=True):
    """Where one tensor's bytes are: absolute offsets into the file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    def __init__(self, key: str, dtype: str, shape: tuple[int, ...], start: int, end: int) -> None:
        values = self.__dict__  # one per tensor in the header: written directly
        values["key"] = key
        values["dtype"] = dtype
        values["shape"] = shape
        values["start"] = start
        values["end"] = end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class Header(Record):
    """A parsed safetensors header: tensors by key (in file order), metadata, and the file's geometry."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    _fd_cache: dict = Factory(dict)

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
        import numpy as np

        info = self.tensors[key]
        arr = np.frombuffer(self.read_bytes(key), dtype=numpy_dtype(info.dtype))
        return arr.reshape(info.shape)

    def read_float32(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        return to_float32(self.read_raw(key), info.dtype)


_PICKLE_HINT = "pass --allow-pickle (allow_pickle=True) to load its tensors with torch.load(weights_only=True)"


# struct formats of the dtypes a one-element tensor (an alpha) is decoded from without numpy.
_SCALAR_STRUCT = {"F16": "<e", "F32": "<f", "F64": "<d", "I8": "<b", "U8": "<B", "I16": "<h", "U16": "<H",
                  "I32": "<i", "U32": "<I", "I64": "<q", "U64": "<Q", "BOOL": "<?"}


def decode_scalar(data: bytes, dtype: str, *, file: str | None = None, key: str | None = None) -> float:
    """The float value of one element's bytes (exact for every dtype; fp8 through the numpy table)."""
    if len(data) != DTYPE_SIZES[dtype]:
        msg = f"file changed or truncated while reading: expected {DTYPE_SIZES[dtype]} bytes, got {len(data)}"
        raise TruncatedFileError(msg, file=file, key=key)
    if dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + data)[0]
    fmt = _SCALAR_STRUCT.get(dtype)
    if fmt is not None:
        return float(struct.unpack(fmt, data)[0])
    import numpy as np

    return float(to_float32(np.frombuffer(data, dtype=numpy_dtype(dtype)), dtype)[0])


class ScalarReader:
    """Reads one-element tensors (alphas) with one open file per source instead of one per tensor.

    Use as a context manager; :meth:`read` takes a :class:`~lorafmt.schema.TensorRef`.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def __enter__(self) -> ScalarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def read(self, ref) -> float:
        if ref.numel != 1:
            msg = f"alpha must be a scalar, found shape {list(ref.shape)}"
            raise ValueError(msg)
        if not ref.streamable or ref.offset is None:
            return ref.scalar()
        fd = self._fds.get(ref.file)
        if fd is None:
            fd = self._fds[ref.file] = os.open(ref.file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return decode_scalar(os.pread(fd, ref.nbytes, ref.offset), ref.dtype, file=ref.file, key=ref.key)


def sniff_container(path: str, head: bytes, size: int) -> None:
    """Raise a precise error for files that are not safetensors: pickles, zips, git-lfs pointers, HTML, GGUF, npy.

    A file whose first 8 bytes are a length that fits the file and is followed by ``{`` is a safetensors file,
    whatever those 8 bytes spell (a 640-byte header starts ``80 02``, like a pickle).
    """
    if len(head) >= 9 and 8 + struct.unpack("<Q", head[:8])[0] <= size and head[8:].lstrip(b" \t\r\n")[:1] == b"{":
        return
    if head.startswith(b"version https://git-lfs"):
        msg = "this is a git-lfs pointer file, not the weights; fetch the real file with `git lfs pull`"
        raise GitLfsPointerError(msg, file=path)
    if head.startswith(b"PK\x03\x04"):
        _refuse_zip(path)
    if len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5):
        msg = "this is a Python pickle (a legacy torch checkpoint), not safetensors"
        raise PickleFileError(msg, file=path, hint=_PICKLE_HINT)
    lowered = head[:64].lstrip().lower()
    if lowered.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        msg = "this is an HTML/XML page (a failed or login-walled download?), not safetensors"
        raise HtmlFileError(msg, file=path)
    for magic, what in _OTHER_MAGIC:
        if head.startswith(magic):
            msg = f"this is {what}, not safetensors"
            raise NotSafetensorsError(msg, file=path)


def _refuse_zip(path: str) -> None:
    """A zip is a torch.save checkpoint (pickle inside: PickleFileError) or some other archive; look at its names only."""
    import zipfile  # only for files that start like a zip (torch checkpoints)

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError):
        names = []
    pickles = [n for n in names if n.endswith(".pkl")]
    if pickles or not names:
        what = "a torch checkpoint saved with torch.save (a zip holding a pickle)" if pickles else "a zip archive"
        msg = f"this is {what}, not safetensors; pickles can run code, so lorafmt does not load them by default"
        raise PickleFileError(msg, file=path, hint=_PICKLE_HINT)
    if all(n.endswith(".npy") for n in names):
        msg = f"this is a numpy .npz archive of {len(names)} arrays, not safetensors"
        raise NotSafetensorsError(msg, file=path)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    msg = f"this is a zip archive ({shown}), not safetensors"
    raise NotSafetensorsError(msg, file=path, hint="unzip it and pass the .safetensors file inside")


_OTHER_MAGIC = (
    (b"GGUF", "a GGUF file (llama.cpp / ComfyUI-GGUF quantized weights)"),
    (b"\x93NUMPY", "a numpy .npy array"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x89HDF", "an HDF5 file (Keras .h5?)"),
)

# Bounds no real LoRA comes near; beyond them a header is hostile or corrupt.
MAX_NDIM = 16
MAX_ELEMENTS = 1 << 48  # product of a shape's non-zero dimensions


def read_header(path: str | os.PathLike, *, make=None) -> Header:
    """Parse and check the header of a safetensors file without reading tensor data.

    Every field is checked before anything trusts it: the length prefix against the file size and a bound,
    the JSON (UTF-8, one object, no duplicate keys, no NaN, no trailing bytes), each tensor's dtype, shape
    and offsets, overlaps, and the data span against the file size.

    Example:
        >>> h = read_header("fixtures/generated/kohya_sd15.safetensors")  # doctest: +SKIP
        >>> sorted(h.tensors)[:1]  # doctest: +SKIP
    """
    path = str(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            msg = "is a directory, expected a .safetensors file"
            raise SourceError(msg, file=path)
        if not stat.S_ISREG(st.st_mode):
            msg = "is not a regular file (a device, pipe or socket)"
            raise SourceError(msg, file=path)
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(64)
            sniff_container(path, head, size)
            if len(head) < 8:
                msg = f"file is {len(head)} bytes long; a safetensors file has at least 8"
                raise FileTooShortError(msg, file=path)
            (n,) = struct.unpack("<Q", head[:8])
            if 8 + n > size:
                if n > MAX_HEADER_BYTES:
                    msg = f"not a safetensors file: its first 8 bytes announce a {n}-byte header in a {size}-byte file"
                    raise ImplausibleHeaderLengthError(msg, file=path)
                msg = (
                    f"file is truncated inside its header: the header needs {8 + n} bytes but the file has {size} "
                    f"({8 + n - size} bytes missing)"
                )
                raise TruncatedHeaderError(msg, file=path)
            if n > MAX_HEADER_BYTES:
                msg = f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"
                raise HeaderTooLargeError(msg, file=path)
            fh.seek(8)
            raw = fh.read(n)
            if len(raw) != n:
                msg = f"file changed while reading its header: expected {n} bytes, got {len(raw)}"
                raise TruncatedHeaderError(msg, file=path)
    except LorafmtError:
        raise
    except FileNotFoundError:
        msg = "no such file"
        raise SourceError(msg, file=path) from None
    except IsADirectoryError:
        msg = "is a directory, expected a .safetensors file"
        raise SourceError(msg, file=path) from None
    except PermissionError:
        msg = "permission denied"
        raise SourceError(msg, file=path) from None
    except OSError as exc:
        msg = f"cannot read: {exc.strerror or exc}"
        raise SourceError(msg, file=path) from None
    return parse_header(path, raw, data_start=8 + n, file_size=size, make=make)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _Pairs(list):
    """A JSON object as the parser saw it: its (key, value) pairs, duplicates included.

    ``json.loads`` builds one per object through this C-level constructor (cheaper than a Python hook for each
    of the thousands of tensor entries); :func:`_as_dict` turns one into a dict, refusing duplicate keys.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(dict(self))


def _as_dict(pairs: _Pairs) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return obj


def _entry_duplicate(path: str, key: str, pairs_or_name: object) -> None:
    name = pairs_or_name
    if type(pairs_or_name) is _Pairs:
        try:
            _as_dict(pairs_or_name)
        except _DuplicateKey as exc:
            name = exc.key
    msg = "key appears twice in the header (a JSON parser would silently keep the last one)"
    raise DuplicateKeyError(msg, file=path, key=name)


def _no_duplicates(value: object) -> object:
    """`value` with every nested JSON object turned into a dict (duplicate keys refused)."""
    if type(value) is _Pairs:
        return {k: _no_duplicates(v) for k, v in _as_dict(value).items()}
    if type(value) is list:
        return [_no_duplicates(v) for v in value]
    return value


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass; a JSON true is not a dimension


def parse_header(path: str, raw: bytes, *, data_start: int, file_size: int, make=None) -> Header:
    """Check header JSON bytes against the safetensors rules and the file's size.

    `make(key, dtype, shape, start, end)` builds each entry of ``Header.tensors`` (default :class:`TensorInfo`;
    the reader builds its lazy tensors directly, one object per tensor instead of two).
    """
    make = make or TensorInfo
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        msg = "not a safetensors file: the header does not begin with a JSON object"
        raise HeaderNotObjectError(msg, file=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"header is not UTF-8 (byte {exc.start})"
        raise HeaderEncodingError(msg, file=path) from None
    try:
        pairs = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_Pairs)
        obj = _as_dict(pairs) if type(pairs) is _Pairs else pairs
    except _DuplicateKey as exc:
        msg = "key appears twice in the header (a JSON parser would silently keep the last one)"
        raise DuplicateKeyError(msg, file=path, key=exc.key) from None
    except RecursionError:
        msg = "header is not valid JSON: nested too deeply"
        raise HeaderJsonError(msg, file=path) from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integers
        msg = f"header is not valid JSON: {_short(str(exc), 120)}"
        raise HeaderJsonError(msg, file=path) from None
    if not isinstance(obj, dict):
        msg = "header is not a JSON object"
        raise HeaderNotObjectError(msg, file=path)

    metadata: dict[str, str] = {}
    meta = obj.pop("__metadata__", None)
    if type(meta) is _Pairs:
        try:
            meta = _as_dict(meta)
        except _DuplicateKey as exc:
            msg = "key appears twice in the header (a JSON parser would silently keep the last one)"
            raise DuplicateKeyError(msg, file=path, key=exc.key) from None
    if meta is not None:
        if not isinstance(meta, dict):
            msg = f"__metadata__ is {_json_type(meta)}, safetensors metadata must be an object of strings"
            raise MetadataError(msg, file=path, key="__metadata__")
        for k, v in meta.items():
            if not isinstance(v, str):
                msg = f"metadata value is {_json_type(v)}, safetensors metadata values must be strings"
                raise MetadataError(msg, file=path, key=f"__metadata__.{k}")
            metadata[k] = v

    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    sizes = DTYPE_SIZES
    for key, entry in obj.items():
        if type(entry) is _Pairs:
            as_dict = dict(entry)
            if len(as_dict) != len(entry):
                _entry_duplicate(path, key, entry)
            entry = as_dict
        # Fast path for a well-formed entry; anything unusual goes through _checked_entry, which names the defect.
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            begin, end = offsets
            numel = 1
            for d in shape:
                if type(d) is not int or d <= 0:
                    raise ValueError
                numel *= d
            if (
                type(entry) is not dict
                or type(shape) is not list
                or len(shape) > MAX_NDIM
                or numel > MAX_ELEMENTS
                or type(begin) is not int
                or type(end) is not int
                or not 0 <= begin <= end
                or end - begin != numel * sizes[dtype]
            ):
                raise ValueError
        except (TypeError, ValueError, KeyError):
            try:
                entry = _no_duplicates(entry)  # objects nested deeper become dicts, for precise messages
            except _DuplicateKey as exc:
                _entry_duplicate(path, key, exc.key)
            begin, end = _checked_entry(path, key, entry)
            dtype, shape = entry["dtype"], entry["shape"]
        tensors[key] = make(key, dtype, tuple(shape), data_start + begin, data_start + end)
        spans.append((begin, end, key))

    if spans:
        last_end, last_key = max((end, key) for _, end, key in spans)
        if last_end > data_len:
            msg = (
                f"file is truncated: its tensor data needs {last_end} bytes but only {data_len} are there "
                f"({last_end - data_len} bytes missing)"
            )
            raise TruncatedDataError(msg, file=path, key=last_key)

    spans.sort()
    prev_end, prev_key = 0, None
    for begin, end, key in spans:
        if begin < prev_end and end > begin:
            msg = f"tensor data overlaps the bytes of tensor {prev_key!r}"
            raise OverlappingDataError(msg, file=path, key=key)
        if end > prev_end:
            prev_end, prev_key = end, key
    return Header(path=path, tensors=tensors, metadata=metadata, data_start=data_start, file_size=file_size)


def _checked_entry(path: str, key: str, entry: object) -> tuple[int, int]:
    """Check one header entry field by field; raise the error that names its defect, else return its offsets."""
    if not isinstance(entry, dict):
        msg = f"tensor entry is {_json_type(entry)}, expected an object with dtype, shape and data_offsets"
        raise HeaderError(msg, file=path, key=key)
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
    if missing:
        msg = f"tensor entry lacks {', '.join(missing)}"
        raise HeaderError(msg, file=path, key=key)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        known = isinstance(dtype, str) and dtype in _UNSUPPORTED_DTYPES
        msg = f"dtype {_short(dtype)} is not supported by lorafmt" if known else f"unknown dtype {_short(dtype)}"
        raise UnknownDtypeError(msg, file=path, key=key)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        msg = f"shape {_short(shape)} is not a list of non-negative integers"
        raise BadShapeError(msg, file=path, key=key)
    if len(shape) > MAX_NDIM or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        msg = f"shape {_short(shape)} is implausibly large"
        raise BadShapeError(msg, file=path, key=key)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        msg = f"data_offsets {_short(offsets)} is not a [begin, end] pair of integers with 0 <= begin <= end"
        raise BadOffsetsError(msg, file=path, key=key)
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        msg = f"shape {shape} x {dtype} needs {expected} bytes but data_offsets span {end - begin}"
        raise ShapeMismatchError(msg, file=path, key=key)
    return begin, end


# safetensors dtypes lorafmt does not decode (sub-byte and exotic types no LoRA uses).
_UNSUPPORTED_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})


def _json_type(value: object) -> str:
    if type(value) is _Pairs:
        return "an object"
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _short(value: object, limit: int = 60) -> str:
    text = value if isinstance(value, str) and limit > 60 else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str) -> None:
    msg = f"non-standard JSON constant {name}"
    raise ValueError(msg)


# --------------------------------------------------------------------------------------------- writing


class WriteEntry(Record, frozen=True):
    """One output tensor: either bytes copied from a file range, or bytes in memory."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | None = None
    src_path: str | None = None
    src_offset: int = 0
    nbytes: int = 0

    def __init__(
        self,
        key: str,
        dtype: str,
        shape: tuple[int, ...],
        data: bytes | memoryview | None = None,
        src_path: str | None = None,
        src_offset: int = 0,
        nbytes: int = 0,
    ) -> None:
        values = self.__dict__  # one per output tensor: written directly
        values["key"] = key
        values["dtype"] = dtype
        values["shape"] = shape
        values["data"] = data
        values["src_path"] = src_path
        values["src_offset"] = src_offset
        values["nbytes"] = nbytes

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.nbytes


def build_header(entries: list[WriteEntry], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and JSON header for `entries`, whose data follows in the order given.

    Keys appear in sorted order in the JSON; the data order is the caller's (see :func:`data_order`).
    """
    spans: dict[str, tuple[WriteEntry, int, int]] = {}
    offset = 0
    sizes = DTYPE_SIZES
    for e in entries:
        size = e.nbytes if e.data is None else len(e.data)
        expected = math.prod(e.shape) * sizes[e.dtype]
        if size != expected:
            msg = f"internal error: {e.key} has {size} bytes, shape {e.shape} {e.dtype} needs {expected}"
            raise AssertionError(msg)
        spans[e.key] = (e, offset, offset + size)
        offset += size
    # The JSON is assembled as text: the tensor entries have a fixed form, and only keys (and metadata) need
    # escaping, which json.dumps does for them. Twice as fast as dumping a dict of dicts.
    dumps = json.dumps
    parts = []
    if metadata:
        meta = {k: metadata[k] for k in sorted(metadata)}
        parts.append('"__metadata__":' + dumps(meta, separators=(",", ":"), ensure_ascii=False))
    for key in sorted(spans):
        e, begin, end = spans[key]
        shape = ",".join(map(str, e.shape))
        # A printable key without quotes or backslashes needs no escaping (json.dumps would return it as is).
        quoted = f'"{key}"' if key.isprintable() and '"' not in key and "\\" not in key else dumps(key, ensure_ascii=False)
        parts.append(f'{quoted}:{{"dtype":"{e.dtype}","shape":[{shape}],"data_offsets":[{begin},{end}]}}')
    raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data buffer to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def data_order(entries: Iterable[WriteEntry]) -> list[WriteEntry]:
    """The order tensor data is laid out in: by key, unless that reads a source file out of order.

    Key order makes a file lorafmt wrote come back byte for byte; when renaming shuffles the keys relative to
    the source (kohya -> diffusers), the streamed tensors follow the source instead, after the in-memory ones
    (by key), so the copy reads the source sequentially, a window at a time. Either way the result depends only
    on the tensors, never on the order they were listed in.
    """
    by_key = sorted(entries, key=lambda e: e.key)
    last: dict[str, int] = {}
    for e in by_key:
        if e.data is None:
            if e.src_offset < last.get(e.src_path, -1):
                break
            last[e.src_path] = e.src_offset
    else:
        return by_key
    memory = [e for e in by_key if e.data is not None]
    streamed = sorted((e for e in by_key if e.data is None), key=lambda e: (e.src_path or "", e.src_offset, e.key))
    return memory + streamed


# Streamed tensors are copied through one reused buffer: a window of the source is read with one pread and its
# tensors written with one writev. Small enough to stay in cache and keep memory flat, large enough that a
# LoRA's tensors (kilobytes to a few MB) go many per system call; bigger tensors are copied kernel-side.
COPY_WINDOW = 1 << 20
_IOV_MAX = 1024  # Linux's and macOS's limit on the parts of one writev


def write_entries(fh, entries: Iterable[WriteEntry]) -> None:
    """Write tensor bytes in the order given, straight to ``fh``'s descriptor (``fh`` is flushed first)."""
    fh.flush()
    out_fd = fh.fileno()
    sources: dict[str, int] = {}
    window = memoryview(bytearray(COPY_WINDOW))
    group: list[WriteEntry] = []  # entries written with one writev: their streamed bytes share one source window
    anchor: list[WriteEntry] = []  # the group's first streamed entry

    def source_fd(path: str) -> int:
        fd = sources.get(path)
        if fd is None:
            fd = sources[path] = os.open(path, os.O_RDONLY)
        return fd

    def flush_group() -> None:
        if not group:
            return
        parts: list = []
        if anchor:
            first = anchor[0]
            start = first.src_offset
            span = max(e.src_offset + e.nbytes for e in group if e.data is None) - start
            got = os.preadv(source_fd(first.src_path), [window[:span]], start) if span else 0
            if got < span:
                short = next(e for e in group if e.data is None and e.src_offset + e.nbytes > start + got)
                msg = f"source ended early: {short.src_offset + short.nbytes - start - got} bytes missing"
                raise TruncatedFileError(msg, file=short.src_path, key=short.key)
        for e in group:
            if e.data is not None:
                parts.append(e.data)
            else:
                begin = e.src_offset - anchor[0].src_offset
                parts.append(window[begin : begin + e.nbytes])
        _write_all(out_fd, parts)
        group.clear()
        anchor.clear()

    try:
        for e in entries:
            if len(group) >= _IOV_MAX:
                flush_group()
            if e.data is not None:
                if len(e.data) > COPY_WINDOW:
                    flush_group()
                    _write_all(out_fd, [e.data])
                else:
                    group.append(e)
                continue
            if e.nbytes > COPY_WINDOW or not hasattr(os, "preadv"):
                flush_group()
                _copy_range(source_fd(e.src_path), out_fd, e.src_offset, e.nbytes, e)
                continue
            if anchor:
                first = anchor[0]
                fits = (
                    e.src_path == first.src_path
                    and e.src_offset >= first.src_offset
                    and e.src_offset + e.nbytes - first.src_offset <= COPY_WINDOW
                )
                if not fits:
                    flush_group()
            if not anchor:
                anchor.append(e)
            group.append(e)
        flush_group()
    finally:
        for fd in sources.values():
            os.close(fd)


# Filesystems whose fallocate(2) reserves blocks natively. Elsewhere glibc's posix_fallocate emulates it by
# writing every block, which would cost more than it saves, so the reservation is skipped.
_NATIVE_FALLOCATE = frozenset({"ext4", "xfs", "btrfs", "tmpfs", "f2fs", "bcachefs"})
_fs_types: dict[int, str | None] = {}


def _filesystem_type(fd: int) -> str | None:
    """The filesystem type holding open file `fd`, from /proc/self/mountinfo (Linux); None when unknown."""
    dev = os.fstat(fd).st_dev
    if dev not in _fs_types:
        found = None
        try:
            wanted = f"{os.major(dev)}:{os.minor(dev)}"
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    fields = line.split()
                    if len(fields) > 2 and fields[2] == wanted and " - " in line:
                        found = line.split(" - ", 1)[1].split()[0]
                        break
        except (OSError, ValueError, IndexError):
            found = None
        _fs_types[dev] = found
    return _fs_types[dev]


def reserve_space(fd: int, size: int) -> None:
    """Reserve `size` bytes for the file being written (its final size), where the filesystem does it natively.

    One fallocate lets the filesystem allocate the whole file at once instead of page by page as the bytes
    arrive (a quarter off the copy of a 100 MB LoRA on ext4), and a full disk is reported before anything is
    written. Output still goes to a temporary file, so a failure here loses nothing.
    """
    if size < COPY_WINDOW or not hasattr(os, "posix_fallocate") or _filesystem_type(fd) not in _NATIVE_FALLOCATE:
        return
    import errno

    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise  # the output cannot fit: reported before anything is written
        # anything else (a mount that refuses the call): the bytes are written all the same, unreserved


def _write_all(fd: int, parts: list) -> None:
    """writev every part, resuming after short writes."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX]) if hasattr(os, "writev") else os.write(fd, views[i])
        if n <= 0:
            msg = "write returned no progress"
            raise OSError(msg)
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


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
            n = os.write(dst, chunk) if chunk else 0  # a short write advances by n; the loop goes on from there
        if n <= 0:
            msg = f"source ended early: {remaining} bytes missing"
            raise TruncatedFileError(msg, file=entry.src_path, key=entry.key)
        remaining -= n
        pos += n


def write_safetensors(
    path: str | os.PathLike,
    entries: list[WriteEntry],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = True,
    durable: bool | None = None,
) -> None:
    """Write a safetensors file atomically (temp file in the same folder, renamed into place).

    `durable`: flush before the rename (default: :func:`lorafmt.io.atomic.wants_fsync` decides).

    Keys are listed in sorted order and data laid out by :func:`data_order`, so the output does not depend
    on the order of `entries`.
    """
    entries = data_order(entries)
    header = build_header(entries, metadata)
    try:
        with atomic_output(path, force=force, durable=durable) as tmp:
            with open_output(tmp) as fh:
                reserve_space(fh.fileno(), len(header) + sum(e.size for e in entries))
                _write_all(fh.fileno(), [header])
                write_entries(fh, entries)
    except OSError as exc:
        if isinstance(exc, LorafmtError):
            raise
        # Disk full, quota, permissions, a source vanishing mid-copy: the temp file is gone, DST untouched.
        msg = f"writing failed, nothing was written: {exc.strerror or exc}"
        raise OutputWriteError(msg, file=str(path)) from exc
