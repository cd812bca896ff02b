"""Exception hierarchy.

Every error lorafmt raises on purpose derives from :class:`LorafmtError` and carries the file, key and
module it concerns, so the CLI can print one line that says what went wrong and where.
"""

from __future__ import annotations

__all__ = [
    "LorafmtError",
    "SourceError",
    "TruncatedFileError",
    "HeaderError",
    "NotSafetensorsError",
    "PickleFileError",
    "GitLfsPointerError",
    "NotALoraError",
    "DetectionError",
    "UnknownLayoutError",
    "AmbiguousLayoutError",
    "LayoutError",
    "MissingTensorError",
    "InconsistentModuleError",
    "UnplacedKeysError",
    "UnsupportedFeatureError",
    "LossyConversionError",
    "OutputExistsError",
    "VerificationError",
    "FuseError",
    "MissingExtraError",
    "RegistryError",
    # hardening: one class per defect (each subclasses one of the classes above)
    "FileTooShortError",
    "TruncatedHeaderError",
    "TruncatedDataError",
    "HeaderLengthError",
    "HeaderTooLargeError",
    "ImplausibleHeaderLengthError",
    "HeaderEncodingError",
    "HeaderJsonError",
    "HeaderNotObjectError",
    "DuplicateKeyError",
    "UnknownDtypeError",
    "BadShapeError",
    "BadOffsetsError",
    "ShapeMismatchError",
    "OverlappingDataError",
    "MetadataError",
    "HtmlFileError",
    "UnsafePickleError",
    "EmptyFileError",
    "FullCheckpointError",
    "EmbeddingFileError",
    "VaeFileError",
    "DuplicateModuleError",
    "OutputWriteError",
    "STRUCTURAL_ERRORS",
]


class LorafmtError(Exception):
    """Base class of every error lorafmt raises on purpose.

    Attributes:
        file: the file the error concerns (or None).
        key: the raw tensor key (or None).
        module: the canonical module path (or None).
        hint: an optional suggestion for the user.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        module: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)
        self.key = key
        self.module = module
        self.hint = hint

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(f"file {_printable(self.file)}")
        if self.key:
            where.append(f"key {_printable(self.key)}")
        if self.module and self.module != self.key:
            where.append(f"module {_printable(self.module)}")
        message = _printable(self.message, limit=1000)
        if where:
            return f"{message} ({', '.join(where)})"
        return message


def _printable(text: str, limit: int = 300) -> str:
    """One line, whatever a hostile file put in its keys: control characters escaped, very long names cut."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SourceError(LorafmtError, ValueError):
    """The input is not a readable safetensors container."""


class TruncatedFileError(SourceError):
    """The file ends before the data its header announces."""


class HeaderError(SourceError):
    """The safetensors header is malformed."""


class NotSafetensorsError(SourceError):
    """The file is not a safetensors file at all (and not one of the kinds we recognise)."""


class PickleFileError(SourceError):
    """The file is a pickle/zip torch checkpoint; refused unless pickle loading was allowed."""


class GitLfsPointerError(SourceError):
    """The file is a git-lfs pointer, not the weights it points to."""


class NotALoraError(SourceError):
    """The file is a valid safetensors file but holds something else (a full model, an embedding, a VAE)."""


class DetectionError(LorafmtError, ValueError):
    """The layout could not be determined."""


class UnknownLayoutError(DetectionError):
    """No layout recognises the file."""


class AmbiguousLayoutError(DetectionError):
    """Several layouts recognise the file equally well."""


class LayoutError(LorafmtError, ValueError):
    """The layout is known but the content violates it."""


class MissingTensorError(LayoutError):
    """A module lacks a tensor its algorithm needs (e.g. an `up` without its `down`)."""


class InconsistentModuleError(LayoutError):
    """A module's tensors disagree (rank mismatch, bad alpha, wrong number of dimensions)."""


class UnplacedKeysError(LayoutError):
    """Some keys could not be placed on a module; refused in strict mode."""


class UnsupportedFeatureError(LorafmtError, ValueError):
    """The target layout cannot express a feature of the input."""


class LossyConversionError(UnsupportedFeatureError):
    """The conversion would lose information and --allow-lossy was not given."""


class OutputExistsError(LorafmtError, FileExistsError):
    """The output exists and --force was not given."""


class VerificationError(LorafmtError, ValueError):
    """A conversion's result does not reproduce the source's effective weights."""


class FuseError(LorafmtError, ValueError):
    """Fusing failed (shape mismatch, no target, non-finite result)."""


class MissingExtraError(LorafmtError, ImportError):
    """An optional dependency is needed for this operation."""


class RegistryError(LorafmtError, LookupError):
    """Unknown or duplicate layout name."""


# ------------------------------------------------------------------------------ one class per defect
# Each defect a hostile or broken file can have gets its own class, derived from the broader class that
# described it before, so ``except HeaderError`` / ``except TruncatedFileError`` keep working.


class FileTooShortError(TruncatedFileError):
    """The file is shorter than the 8-byte header-length prefix (empty or cut off at the start)."""


class HeaderLengthError(HeaderError):
    """The 8-byte header length is impossible (beyond the file, or beyond the sane bound)."""


class TruncatedHeaderError(HeaderLengthError, TruncatedFileError):
    """The header length points past the end of the file."""


class HeaderTooLargeError(HeaderLengthError):
    """The header length exceeds the bound the reference implementation accepts (100 MB)."""


class ImplausibleHeaderLengthError(HeaderLengthError, NotSafetensorsError):
    """The first 8 bytes are not a plausible header length at all: not a safetensors file."""


class HeaderEncodingError(HeaderError):
    """The header bytes are not UTF-8."""


class HeaderJsonError(HeaderError):
    """The header is not valid JSON (syntax, trailing garbage, NaN/Infinity, nesting too deep)."""


class HeaderNotObjectError(HeaderError, NotSafetensorsError):
    """The header is JSON but not an object."""


class DuplicateKeyError(HeaderError):
    """A key appears twice in the header JSON (a JSON parser would silently keep the last one)."""


class UnknownDtypeError(HeaderError):
    """A tensor's dtype is not a safetensors dtype name."""


class BadShapeError(HeaderError):
    """A tensor's shape is not a list of non-negative integers of sane size."""


class BadOffsetsError(HeaderError):
    """A tensor's data_offsets is not a [begin, end] pair of integers with begin <= end."""


class ShapeMismatchError(HeaderError):
    """A tensor's shape x dtype size differs from its byte span."""


class OverlappingDataError(HeaderError):
    """Two tensors' byte ranges overlap."""


class TruncatedDataError(TruncatedFileError):
    """A tensor's bytes lie (partly) past the end of the file."""


class MetadataError(HeaderError):
    """``__metadata__`` is not an object of strings."""


class HtmlFileError(NotSafetensorsError):
    """The file is an HTML/XML page (a failed or login-walled download), not weights."""


class UnsafePickleError(PickleFileError):
    """``torch.load(weights_only=True)`` refused the pickle: it references code, not just tensors."""


class EmptyFileError(UnknownLayoutError):
    """The file is a valid container but holds no tensors."""


class FullCheckpointError(NotALoraError):
    """The file is a full model (SD/SDXL/Flux checkpoint, diffusers U-Net/transformer, text encoder), not a LoRA."""


class EmbeddingFileError(NotALoraError):
    """The file is a textual-inversion embedding, not a LoRA."""


class VaeFileError(NotALoraError):
    """The file is a VAE, not a LoRA."""


class DuplicateModuleError(LayoutError):
    """One module is spelled twice (``lora_te_`` and ``lora_te1_``, SGM and diffusers names, ...)."""


class OutputWriteError(LorafmtError, OSError):
    """Writing the output failed (disk full, permission denied, ...); nothing was left behind."""


# Structural finding code (see ``lorafmt.layouts._common.assemble``) -> the error convert/fuse raise for it.
STRUCTURAL_ERRORS: dict[str, type[LayoutError]] = {
    "R001": MissingTensorError,  # parameters no algorithm explains (an alpha with no weights, ...)
    "R002": MissingTensorError,  # orphan half (up without down)
    "R003": InconsistentModuleError,  # rank mismatch, wrong dimensions
    "R004": InconsistentModuleError,  # alpha not a positive finite scalar
    "R005": DuplicateModuleError,  # module spelled twice
}
