"""Pre-upload validation for the Hugging Face Hub: refuse to upload a LoRA that would not load.

Wrap an ``HfApi`` (or anything with the same methods) with :func:`guard`; its ``upload_file``,
``upload_folder`` and ``create_commit`` then validate every LoRA file about to be uploaded (header only, no
torch, nothing sent anywhere) and raise :class:`UploadRefusedError` with the reports when any fails. Nothing is
uploaded in that case; otherwise the call goes through to the wrapped API unchanged. Every other attribute is
the wrapped API's own.

What counts as a LoRA file: every ``*.safetensors`` that is about to be uploaded (after ``allow_patterns`` /
``ignore_patterns``, as ``upload_folder`` applies them), and a PEFT adapter folder (one with
``adapter_config.json``) as a whole. Files lorafmt recognises as something else (a full checkpoint, a VAE, an
embedding) or whose layout it does not know are skipped, not refused; broken files (truncated, bad header) are
refused.

Example:
    >>> from huggingface_hub import HfApi
    >>> from lorafmt.hooks import guard
    >>> api = guard(HfApi(), family="sdxl")
    >>> api.upload_file(path_or_fileobj="my_lora.safetensors", path_in_repo="my_lora.safetensors",
    ...                 repo_id="me/my-lora")  # doctest: +SKIP
    Traceback (most recent call last):
    lorafmt.hooks.UploadRefusedError: refusing to upload: my_lora.safetensors: 1 error (V107 ...)
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lorafmt.errors import LorafmtError, NotALoraError, UnknownLayoutError
from lorafmt.validate import Report, validate

__all__ = [
    "UploadCheck",
    "UploadRefusedError",
    "ValidatingHfApi",
    "check_upload",
    "files_in_folder_upload",
    "guard",
    "validate_before_upload",
]

PEFT_CONFIG = "adapter_config.json"


@dataclass
class UploadCheck:
    """The verdict on one item of an upload.

    Attributes:
        path_in_repo: where it would land in the repository.
        report: the validation report (None when skipped or unusable).
        error: why the file is unusable (a broken LoRA file), or None.
        skipped: why it was not validated (not a LoRA), or None.
    """

    path_in_repo: str
    report: Report | None = None
    error: str | None = None
    skipped: str | None = None

    @property
    def refused(self) -> bool:
        return self.error is not None or (self.report is not None and not self.report.valid)

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.path_in_repo}: unusable: {self.error}"
        if self.skipped is not None:
            return f"{self.path_in_repo}: skipped ({self.skipped})"
        assert self.report is not None
        head = self.report.findings[:3]
        codes = "; ".join(f"{f.code} {f.module or f.key or ''}: {f.message}" for f in head)
        more = f"; and {len(self.report.findings) - len(head)} more" if len(self.report.findings) > len(head) else ""
        return f"{self.path_in_repo}: {self.report.summary()}" + (f" ({codes}{more})" if codes else "")


class UploadRefusedError(LorafmtError):
    """An upload was stopped because a LoRA in it failed validation.

    Attributes:
        checks: the verdict on every item of the upload (refused ones and the rest).
    """

    def __init__(self, checks: list[UploadCheck]) -> None:
        self.checks = checks
        refused = [c for c in checks if c.refused]
        message = "refusing to upload: " + " | ".join(c.describe() for c in refused)
        first = refused[0] if refused else None
        super().__init__(
            message,
            file=first.path_in_repo if first else None,
            hint="run `lorafmt validate` on the file(s) for the full report",
        )

    @property
    def reports(self) -> list[Report]:
        return [c.report for c in self.checks if c.report is not None]


def _is_lora_candidate(path_in_repo: str) -> bool:
    return path_in_repo.lower().endswith(".safetensors")


def _check_one(path_in_repo: str, local: str, family: str | None, check_values: bool, strict: bool) -> UploadCheck:
    try:
        report = validate(local, family=family, check_values=check_values)
    except NotALoraError as exc:
        return UploadCheck(path_in_repo, skipped=f"not a LoRA: {exc.message}")
    except UnknownLayoutError as exc:
        if strict:
            return UploadCheck(path_in_repo, error=exc.message)
        return UploadCheck(path_in_repo, skipped=f"layout not recognised: {exc.message}")
    except LorafmtError as exc:
        return UploadCheck(path_in_repo, error=exc.message)
    report.file = path_in_repo
    for finding in report.findings:
        finding.file = path_in_repo
    return UploadCheck(path_in_repo, report=report)


def _materialise(content: str | os.PathLike | bytes | BinaryIO, tmpdir: str, name: str) -> str:
    """A local path holding ``content`` (paths pass through; bytes and file objects are copied to ``tmpdir``)."""
    if isinstance(content, (str, os.PathLike)):
        return os.fspath(content)
    target = os.path.join(tmpdir, f"{len(os.listdir(tmpdir))}-{Path(name).name or 'upload.safetensors'}")
    if isinstance(content, (bytes, bytearray, memoryview)):
        Path(target).write_bytes(bytes(content))
        return target
    if isinstance(content, io.IOBase) or hasattr(content, "read"):
        start = content.tell() if content.seekable() else None
        with open(target, "wb") as fh:
            while chunk := content.read(1 << 20):
                fh.write(chunk)
        if start is not None:
            content.seek(start)  # leave the stream where the uploader expects it
        return target
    msg = f"cannot validate upload content of type {type(content).__name__}"
    raise LorafmtError(msg, file=name)


def check_upload(
    items: Iterable[tuple[str, str | os.PathLike | bytes | BinaryIO]],
    *,
    family: str | None = None,
    check_values: bool = False,
    strict: bool = False,
) -> list[UploadCheck]:
    """Validate each ``(path_in_repo, content)`` whose name ends in ``.safetensors``; content is a path, bytes or a
    binary file object, or a PEFT adapter folder path. Returns one :class:`UploadCheck` per validated item.

    ``strict=True`` also refuses ``.safetensors`` files whose layout lorafmt does not recognise.

    Example:
        >>> checks = check_upload([("lora.safetensors", "out/lora.safetensors")], family="sd1")  # doctest: +SKIP
        >>> [c.refused for c in checks]  # doctest: +SKIP
        [False]
    """
    checks: list[UploadCheck] = []
    with tempfile.TemporaryDirectory(prefix="lorafmt-upload-") as tmpdir:
        for path_in_repo, content in items:
            is_folder = isinstance(content, (str, os.PathLike)) and os.path.isdir(content)
            if not is_folder and not _is_lora_candidate(path_in_repo):
                continue
            local = _materialise(content, tmpdir, path_in_repo)
            checks.append(_check_one(path_in_repo, local, family, check_values, strict))
    return checks


def validate_before_upload(
    items: Iterable[tuple[str, str | os.PathLike | bytes | BinaryIO]],
    *,
    family: str | None = None,
    check_values: bool = False,
    strict: bool = False,
) -> list[UploadCheck]:
    """:func:`check_upload`, raising :class:`UploadRefusedError` when any item is refused."""
    checks = check_upload(items, family=family, check_values=check_values, strict=strict)
    if any(c.refused for c in checks):
        raise UploadRefusedError(checks)
    return checks


def files_in_folder_upload(
    folder_path: str | os.PathLike,
    path_in_repo: str | None = None,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
) -> list[tuple[str, str]]:
    """What ``HfApi.upload_folder`` would upload, as ``(path_in_repo, local path)`` items to validate.

    Applies the patterns the way ``upload_folder`` does (plus its default ignores such as ``.git``). A PEFT adapter
    folder (one holding ``adapter_config.json``) is one item, the folder itself, instead of its files.
    """
    from huggingface_hub.utils import filter_repo_objects

    try:
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
    except ImportError:  # pragma: no cover - older/newer huggingface_hub
        DEFAULT_IGNORE_PATTERNS = [".git", ".git/*", "*/.git", "**/.git/**"]
    root = Path(folder_path).expanduser().resolve()
    ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
    ignore += DEFAULT_IGNORE_PATTERNS
    relpaths = {p.relative_to(root).as_posix(): p for p in sorted(root.glob("**/*")) if p.is_file()}
    kept = list(filter_repo_objects(relpaths, allow_patterns=allow_patterns, ignore_patterns=ignore))
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
    units = sorted({_peft_unit(rel) for rel in kept if rel == PEFT_CONFIG or rel.endswith("/" + PEFT_CONFIG)})
    items: list[tuple[str, str]] = [
        ((prefix + unit).rstrip("/") or ".", str(root / unit) if unit else str(root)) for unit in units
    ]
    for rel in kept:
        if rel.endswith(".safetensors") and any(unit == "" or rel.startswith(unit + "/") for unit in units):
            continue  # validated with its adapter folder
        items.append((prefix + rel, str(relpaths[rel])))
    return items


_COMPONENTS = frozenset({"unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"})


def _peft_unit(config_rel: str) -> str:
    """The folder to read as one LoRA for an ``adapter_config.json``: its own folder, or the parent of a diffusers
    component folder (``unet/``, ``text_encoder/`` ...), which together make one PEFT LoRA."""
    folder = config_rel.rsplit("/", 1)[0] if "/" in config_rel else ""
    parent, _, name = folder.rpartition("/")
    return parent if name in _COMPONENTS else folder


class ValidatingHfApi:
    """An ``HfApi`` proxy whose uploads validate the LoRAs in them first (see :func:`guard`)."""

    def __init__(self, api: Any, *, family: str | None = None, check_values: bool = False, strict: bool = False):
        self._api = api
        self._options = {"family": family, "check_values": check_values, "strict": strict}
        self.last_checks: list[UploadCheck] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    def _validate(self, items: Iterable[tuple[str, Any]]) -> None:
        self.last_checks = validate_before_upload(items, **self._options)

    def upload_file(self, *, path_or_fileobj: Any, path_in_repo: str, **kwargs: Any) -> Any:
        """Validate, then ``api.upload_file(...)`` with the same arguments."""
        self._validate([(path_in_repo, path_or_fileobj)])
        return self._api.upload_file(path_or_fileobj=path_or_fileobj, path_in_repo=path_in_repo, **kwargs)

    def upload_folder(
        self,
        *,
        folder_path: str | os.PathLike,
        path_in_repo: str | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Validate the LoRAs among the files ``upload_folder`` would send, then ``api.upload_folder(...)``."""
        self._validate(files_in_folder_upload(folder_path, path_in_repo, allow_patterns, ignore_patterns))
        return self._api.upload_folder(
            folder_path=folder_path,
            path_in_repo=path_in_repo,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            **kwargs,
        )

    def create_commit(self, repo_id: str, operations: Iterable[Any], *args: Any, **kwargs: Any) -> Any:
        """Validate every add operation (``path_in_repo`` + ``path_or_fileobj``), then ``api.create_commit(...)``."""
        operations = list(operations)
        adds = [
            (op.path_in_repo, op.path_or_fileobj)
            for op in operations
            if hasattr(op, "path_or_fileobj") and hasattr(op, "path_in_repo")
        ]
        self._validate(adds)
        return self._api.create_commit(repo_id, operations, *args, **kwargs)


def guard(api: Any = None, *, family: str | None = None, check_values: bool = False, strict: bool = False):
    """Wrap ``api`` (default: a new ``huggingface_hub.HfApi()``) so its uploads validate LoRAs first.

    Args:
        api: an ``HfApi`` or any object with ``upload_file`` / ``upload_folder`` / ``create_commit``.
        family: validate against this family; None: each file's metadata, else its best-fitting family.
        check_values: also read tensor values (NaN/Inf, all-zero, outlier norms, fp16 overflow).
        strict: also refuse ``.safetensors`` files whose layout lorafmt does not recognise.

    Example:
        >>> api = guard(HfApi(), family="flux1")  # doctest: +SKIP
        >>> api.upload_folder(folder_path="out", repo_id="me/my-flux-lora")  # doctest: +SKIP
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    return ValidatingHfApi(api, family=family, check_values=check_values, strict=strict)
