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
            where.append(f"file {self.file}")
        if self.key:
            where.append(f"key {self.key}")
        if self.module and self.module != self.key:
            where.append(f"module {self.module}")
        if where:
            return f"{self.message} ({', '.join(where)})"
        return self.message


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
