"""The canonical, typed schema every layout reads into and writes from.

A :class:`LoraFile` is a set of :class:`Module` s keyed by canonical module path
(``<component>.<diffusers/transformers module path>``), each holding its algorithm, its tensors as lazy
:class:`TensorRef` s (shape, dtype and where the bytes are), its alpha, and an optional DoRA magnitude.
Nothing here reads tensor data until asked.

Example:
    >>> import lorafmt
    >>> lora = lorafmt.read("fixtures/generated/kohya_sd15.safetensors")  # doctest: +SKIP
    >>> m = lora.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]  # doctest: +SKIP
    >>> m.rank, m.scale  # doctest: +SKIP
    (4, 1.0)
"""

from __future__ import annotations

import math

from lorafmt._record import Factory, Record, as_dataclass
from lorafmt.dtypes import DTYPE_SIZES, FLOAT_DTYPES, from_float32, numpy_dtype, to_float32

TYPE_CHECKING = False  # `typing` costs milliseconds to import: annotations are strings, resolved only by pydantic
if TYPE_CHECKING:
    from typing import Any, Literal

    import numpy as np  # imported on first use: header-only commands never load it

__all__ = [
    "SchemaModel",
    "TensorRef",
    "Module",
    "LoraFile",
    "Provenance",
    "Detection",
    "Diagnostic",
    "ConversionReport",
    "ALGORITHMS",
    "COMPONENTS",
    "FAMILIES",
    "pydantic_ready",
]

SCHEMA_VERSION = 1
ALGORITHMS = ("lora", "loha", "lokr", "full", "norm", "ia3", "oft", "boft")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux1", "amused")

# pydantic reads this from each class: the string under a field becomes its JSON Schema description.
_PYDANTIC_CONFIG = {"use_attribute_docstrings": True}
_SCHEMA_CLASSES: list[type] = []


def pydantic_ready() -> None:
    """Make every schema class something pydantic can validate, serialise and describe (idempotent).

    The classes are registered as dataclasses, and the ``typing`` names their string annotations use are made
    resolvable in their modules. Called on first use of a ``model_*`` method, and by modules that declare
    pydantic models with schema-class fields before they declare them.
    """
    import sys
    import typing

    for cls in _SCHEMA_CLASSES:
        namespace = sys.modules[cls.__module__].__dict__
        for name in ("Any", "ClassVar", "Literal"):
            namespace.setdefault(name, getattr(typing, name))
        as_dataclass(cls)


class SchemaModel(Record):
    """pydantic v2 validation, serialisation and JSON Schema for lorafmt's record classes.

    The canonical classes are plain records: building the thousands of them a header describes costs
    microseconds and imports neither pydantic nor ``dataclasses``, which keeps rename-only conversions near
    the cost of copying the bytes (issue #8). pydantic v2 validates and describes them (as dataclasses)
    through a ``TypeAdapter`` built on first use, behind the familiar ``model_*`` names.

    Example:
        >>> from lorafmt.schema import Diagnostic
        >>> Diagnostic.model_validate({"code": "X1", "message": "hello"}).severity
        'info'
    """

    __slots__ = ()
    __pydantic_config__ = _PYDANTIC_CONFIG

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _SCHEMA_CLASSES.append(cls)

    @classmethod
    def _adapter(cls):
        adapter = cls.__dict__.get("_pydantic_adapter")
        if adapter is None:
            pydantic_ready()
            from pydantic import TypeAdapter

            adapter = TypeAdapter(cls)
            type.__setattr__(cls, "_pydantic_adapter", adapter)
        return adapter

    @classmethod
    def model_validate(cls, obj: Any):
        """Validate a mapping (e.g. parsed JSON) into an instance; raises ``pydantic.ValidationError``."""
        return cls._adapter().validate_python(obj)

    @classmethod
    def model_validate_json(cls, data: str | bytes):
        return cls._adapter().validate_json(data)

    @classmethod
    def model_json_schema(cls, **kwargs: Any) -> dict[str, Any]:
        """The JSON Schema pydantic derives for this class (what ``schemas/`` holds)."""
        return cls._adapter().json_schema(**kwargs)

    @classmethod
    def model_construct(cls, **fields: Any):
        """Build without validation (the constructor; kept for pydantic-style callers)."""
        return cls(**fields)

    def model_dump(self, *, mode: str = "python", **kwargs: Any) -> dict[str, Any]:
        """A plain dict of the fields, recursively (``mode="json"`` gives JSON-safe values)."""
        return type(self)._adapter().dump_python(self, mode=mode, **kwargs)

    def model_dump_json(self, **kwargs: Any) -> str:
        return type(self)._adapter().dump_json(self, **kwargs).decode("utf-8")

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False):
        """A copy with some fields replaced, unvalidated, keeping in-memory tensor data (as pydantic's does)."""
        if deep:
            import copy

            new = copy.deepcopy(self)
        else:
            new = object.__new__(type(self))
            new.__dict__.update(self.__dict__)
        if update:
            new.__dict__.update(update)
        return new


class TensorRef(SchemaModel, frozen=True):
    """A lazy tensor: its shape and dtype, and either a byte range in a file or an array in memory.

    Reshaping keeps the byte range (no data is touched), so renames and reshapes stream bytes.
    """

    key: str
    """The raw key this tensor had in its source (for error messages)."""
    dtype: str
    """safetensors dtype name, e.g. F16, BF16, F32."""
    shape: tuple[int, ...]
    file: str | None = None
    """Source file, when the bytes live in a file."""
    offset: int | None = None
    """Absolute byte offset of the data in `file`."""

    # In-memory values: plain attributes, not fields (never validated or serialised), set with
    # object.__setattr__: `_array` holds a numpy array, `_bytes` already-encoded bytes (small tensors such as
    # alphas, built without importing numpy).
    _array = None
    _bytes = None

    def __init__(
        self, *, key: str, dtype: str, shape: tuple[int, ...], file: str | None = None, offset: int | None = None
    ) -> None:
        values = self.__dict__  # written directly: thousands are built per file, and the class is immutable
        values["key"] = key
        values["dtype"] = dtype
        values["shape"] = shape
        values["file"] = file
        values["offset"] = offset

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_array(cls, key: str, array: np.ndarray, dtype: str | None = None) -> TensorRef:
        """Wrap an in-memory float array; it is stored (and later written) as `dtype` (default: F32)."""
        import numpy as np

        dtype = dtype or _dtype_of(array)
        ref = cls(key=key, dtype=dtype, shape=tuple(int(d) for d in array.shape))
        if dtype in FLOAT_DTYPES and dtype not in ("F8_E5M2", "F8_E4M3"):
            stored = from_float32(np.asarray(array, dtype=np.float32), dtype)
        else:
            stored = np.ascontiguousarray(array).astype(numpy_dtype(dtype))
        object.__setattr__(ref, "_array", stored.reshape(ref.shape))
        return ref

    @classmethod
    def from_bytes(cls, key: str, dtype: str, shape: tuple[int, ...], data: bytes) -> TensorRef:
        """Wrap bytes already encoded as `dtype` (little-endian, as safetensors stores them)."""
        ref = cls(key=key, dtype=dtype, shape=tuple(shape))
        if len(data) != ref.nbytes:
            msg = f"{key}: {len(data)} bytes cannot hold shape {list(ref.shape)} of {dtype}"
            raise ValueError(msg)
        object.__setattr__(ref, "_bytes", bytes(data))
        return ref

    @classmethod
    def from_raw(cls, key: str, dtype: str, raw: np.ndarray) -> TensorRef:
        """Wrap an array already encoded as `dtype` (as :func:`lorafmt.dtypes.numpy_dtype` holds it)."""
        import numpy as np

        ref = cls(key=key, dtype=dtype, shape=tuple(int(d) for d in raw.shape))
        object.__setattr__(ref, "_array", np.ascontiguousarray(raw))
        return ref

    def raw(self) -> np.ndarray:
        """The stored values, encoded as :func:`lorafmt.dtypes.numpy_dtype` gives (bf16 as uint16)."""
        if self._array is not None:
            return self._array.reshape(self.shape)
        import numpy as np

        if self._bytes is not None:
            return np.frombuffer(self._bytes, dtype=numpy_dtype(self.dtype)).reshape(self.shape)
        if self.file is None or self.offset is None:
            msg = f"tensor {self.key} has no data"
            raise ValueError(msg)

        with open(self.file, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.nbytes)
        if len(data) != self.nbytes:
            from lorafmt.errors import TruncatedFileError

            msg = f"expected {self.nbytes} bytes, got {len(data)}"
            raise TruncatedFileError(msg, file=self.file, key=self.key)
        return np.frombuffer(data, dtype=numpy_dtype(self.dtype)).reshape(self.shape)

    def float32(self) -> np.ndarray:
        """Decode to float32 (exact for F16/BF16/F32)."""
        return to_float32(self.raw(), self.dtype)

    def tobytes(self) -> bytes:
        if self._bytes is not None:
            return self._bytes
        import numpy as np

        return np.ascontiguousarray(self.raw()).tobytes()

    def scalar(self) -> float:
        """The value of a one-element tensor (an alpha) as a float; reads only its bytes, without numpy."""
        from lorafmt.io.safetensors_io import decode_scalar

        if self.numel != 1:
            msg = f"expected a scalar, found shape {list(self.shape)}"
            raise ValueError(msg)
        if self._bytes is not None:
            return decode_scalar(self._bytes, self.dtype, key=self.key)
        if self._array is not None or self.file is None or self.offset is None:
            return float(self.float32().reshape(-1)[0])
        with open(self.file, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.nbytes)
        return decode_scalar(data, self.dtype, file=self.file, key=self.key)

    def reshape(self, shape: tuple[int, ...]) -> TensorRef:
        """The same bytes under another shape (same number of elements)."""
        shape = tuple(shape)
        if math.prod(shape) != self.numel:
            msg = f"cannot reshape {self.shape} to {shape}"
            raise ValueError(msg)
        ref = TensorRef(key=self.key, dtype=self.dtype, shape=shape, file=self.file, offset=self.offset)
        if self._array is not None:
            object.__setattr__(ref, "_array", self._array.reshape(shape))
        if self._bytes is not None:
            object.__setattr__(ref, "_bytes", self._bytes)
        return ref

    def renamed(self, key: str) -> TensorRef:
        ref = TensorRef(key=key, dtype=self.dtype, shape=self.shape, file=self.file, offset=self.offset)
        if self._array is not None:
            object.__setattr__(ref, "_array", self._array)
        if self._bytes is not None:
            object.__setattr__(ref, "_bytes", self._bytes)
        return ref

    @property
    def streamable(self) -> bool:
        """True when the bytes can be copied straight from the source file."""
        return self._array is None and self._bytes is None and self.file is not None


def _dtype_of(array: np.ndarray) -> str:
    import numpy as np

    kind = np.asarray(array).dtype
    if kind == np.float16:
        return "F16"
    if kind == np.float64:
        return "F64"
    return "F32"


class Module(SchemaModel):
    """One adapted module: its algorithm's tensors by role, its alpha, and an optional DoRA magnitude.

    Roles per algorithm: ``lora``: ``down``, ``up``, optional ``mid`` (Tucker) and ``bias`` (lora_B.bias);
    ``loha``: ``w1_a w1_b w2_a w2_b`` (+ ``t1 t2``); ``lokr``: ``w1`` or ``w1_a w1_b``, ``w2`` or ``w2_a w2_b``
    (+ ``t2``); ``full``: ``diff`` (+ ``diff_b``); ``norm``: ``w_norm`` (+ ``b_norm``); ``ia3``: ``weight``,
    ``on_input``; ``oft``/``boft``: ``blocks`` (+ ``rescale``).

    ``alpha`` follows the kohya convention: the effective scale is ``alpha / rank`` (absent = rank, scale 1).
    """

    path: str
    """Canonical module path: <component>.<module path>."""
    algorithm: Literal["lora", "loha", "lokr", "full", "norm", "ia3", "oft", "boft"] = "lora"
    tensors: dict[str, TensorRef]
    alpha: float | None = None
    """Network alpha; scale = alpha / rank. None means rank."""
    alpha_dtype: str | None = None
    """dtype the alpha scalar was stored in, if any."""
    dora_scale: TensorRef | None = None
    """DoRA magnitude vector, if the module is DoRA."""
    dora_axis: Literal["out", "in"] | None = None
    """Whether the DoRA magnitude is per output row (PEFT) or per input column."""
    extras: dict[str, TensorRef] = Factory(dict)
    """Extra per-module tensors kept verbatim (e.g. A1111 `scale`)."""
    mode: Literal["add", "set"] = "add"
    """add: the algorithm's weight change is added to the base parameter (every LoRA-family algorithm); set: the
    `full` algorithm's `diff` tensor *replaces* the base parameter (ComfyUI `set` patches, BFL Flux Control norm
    scales). Layouts that cannot say `set` refuse such modules."""

    def __init__(
        self,
        *,
        path: str,
        tensors: dict[str, TensorRef],
        algorithm: str = "lora",
        alpha: float | None = None,
        alpha_dtype: str | None = None,
        dora_scale: TensorRef | None = None,
        dora_axis: str | None = None,
        extras: dict[str, TensorRef] | None = None,
        mode: str = "add",
    ) -> None:
        values = self.__dict__
        values["path"] = path
        values["algorithm"] = algorithm
        values["tensors"] = tensors
        values["alpha"] = alpha
        values["alpha_dtype"] = alpha_dtype
        values["dora_scale"] = dora_scale
        values["dora_axis"] = dora_axis
        values["extras"] = {} if extras is None else extras
        values["mode"] = mode

    @property
    def component(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def rank(self) -> int | None:
        """The rank the alpha is divided by (the rule every loader uses; None for rank-less algorithms)."""
        from lorafmt.algorithms import get_algorithm

        return get_algorithm(self.algorithm).rank(self)

    @property
    def scale(self) -> float:
        """The effective multiplier on the algorithm's product: alpha / rank, or 1."""
        rank = self.rank
        if self.alpha is None or not rank:
            return 1.0
        return float(self.alpha) / rank

    def all_tensors(self) -> dict[str, TensorRef]:
        out = dict(self.tensors)
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        for k, v in self.extras.items():
            out[f"extra:{k}"] = v
        return out


class Diagnostic(SchemaModel):
    """A note about one module or key: a loss, a fold, a structural problem."""

    code: str
    severity: Literal["error", "warning", "info"] = "info"
    message: str
    module: str | None = None
    key: str | None = None
    data: dict[str, Any] = Factory(dict)


class Provenance(SchemaModel):
    """Where a LoraFile came from: the source, the layout read, and the evidence for its family."""

    source: str | None = None
    layout: str | None = None
    evidence: list[str] = Factory(list)


class LoraFile(SchemaModel):
    """A LoRA in canonical form.

    Example:
        >>> import lorafmt
        >>> lora = lorafmt.read("fixtures/generated/kohya_sd15.safetensors")  # doctest: +SKIP
        >>> lora.family, len(lora.modules)  # doctest: +SKIP
        ('sd1', 128)
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    family: str | None = None
    """Base-model family id (sd1, sd2, sdxl, sd3, flux1, amused)."""
    modules: dict[str, Module] = Factory(dict)
    metadata: dict[str, str] = Factory(dict)
    """safetensors metadata, verbatim."""
    unplaced: dict[str, TensorRef] = Factory(dict)
    """Raw keys that could not be placed on a module (never dropped silently)."""
    issues: list[Diagnostic] = Factory(list)
    """Structural problems found while reading (orphan tensors, rank mismatch, duplicate spellings)."""
    provenance: Provenance = Factory(Provenance)

    @property
    def algorithms(self) -> list[str]:
        return sorted({m.algorithm for m in self.modules.values()})

    @property
    def components(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            out[m.component] = out.get(m.component, 0) + 1
        return dict(sorted(out.items()))

    @property
    def has_dora(self) -> bool:
        return any(m.dora_scale is not None for m in self.modules.values())

    def tensor_count(self) -> int:
        return sum(len(m.all_tensors()) + (m.alpha is not None) for m in self.modules.values()) + len(self.unplaced)


class Detection(SchemaModel):
    """What :func:`lorafmt.detect` found: the layout, its score and evidence, and the other candidates."""

    layout: str
    score: int
    evidence: list[str] = Factory(list)
    family: str | None = None
    family_evidence: list[str] = Factory(list)
    candidates: dict[str, int] = Factory(dict)


class ConversionReport(SchemaModel):
    """What a conversion did: layouts, counts, and every note about losses, folds or reshapes."""

    source: str | None = None
    destination: str | None = None
    source_layout: str | None = None
    target_layout: str
    family: str | None = None
    modules: int = 0
    tensors_written: int = 0
    bytes_streamed: int = 0
    bytes_computed: int = 0
    notes: list[Diagnostic] = Factory(list)
    verified: bool | None = None
