"""Atomic outputs: write to a temporary sibling, rename it into place; clean up on any failure.

Durability policy: a process that fails or is killed never leaves a half-written output (the rename is atomic).
Surviving a *power loss* needs an fsync, which costs about as much as the copy itself, so it is spent where data
would otherwise be lost: when an output replaces an existing file or folder (``--force``, converting a file onto
its own path) the new bytes are flushed before the rename, so the old ones can never be replaced by a truncated
file. A brand-new output is flushed only when ``LORAFMT_FSYNC=always`` (or ``lorafmt --fsync``) asks for it:
losing it to a power cut loses nothing that existed before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from lorafmt.errors import LorafmtError, OutputExistsError, OutputWriteError, SourceError

__all__ = ["atomic_output", "atomic_directory", "wants_fsync", "open_output"]

FSYNC_ENV = "LORAFMT_FSYNC"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(target: Path, base: int) -> int:
    """Keep an existing output's permissions; otherwise what open() would give (mkstemp makes 0600)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return base & ~_umask()


def _sibling_name(target: Path, suffix: str) -> Path:
    # A hidden, unpredictable name next to the target (what tempfile.mkstemp makes, without importing tempfile
    # and shutil on the fast path).
    return target.parent / f".{target.name}.{os.urandom(6).hex()}{suffix}"


def _make_temp_file(target: Path) -> str:
    for _ in range(100):
        path = _sibling_name(target, ".tmp")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return str(path)
    msg = f"no free temporary name next to {target}"
    raise FileExistsError(msg)


def _make_temp_dir(target: Path, suffix: str = ".tmp") -> Path:
    for _ in range(100):
        path = _sibling_name(target, suffix)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    msg = f"no free temporary name next to {target}"
    raise FileExistsError(msg)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def open_output(path: str | Path):
    """Open a temporary output for writing, binary, without ``O_TRUNC``.

    ext4 (default ``auto_da_alloc``) treats truncating a file and rewriting it as a replace-by-truncate and
    forces its data to disk on close, which costs as much as an fsync. The temporary files here are created
    empty, so there is nothing to truncate; a leftover non-empty file is emptied with ftruncate instead.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def wants_fsync(target: Path) -> bool:
    """Whether an output written to `target` is flushed to disk before it is renamed into place."""
    setting = os.environ.get(FSYNC_ENV, "auto").strip().lower()
    if setting in ("always", "1", "true", "yes", "on"):
        return True
    return target.exists() or target.is_symlink()


def _check_target(target: Path, force: bool, want_dir: bool) -> None:
    if target.exists() or target.is_symlink():
        if not force:
            msg = "output exists; pass --force (force=True) to replace it"
            raise OutputExistsError(msg, file=str(target))
        if want_dir != target.is_dir():
            kind = "a directory" if target.is_dir() else "a file"
            msg = f"output exists and is {kind}; refusing to replace it with a {'directory' if want_dir else 'file'}"
            raise OutputExistsError(msg, file=str(target))
    parent = target.parent
    if not parent.is_dir():
        msg = "output folder does not exist"
        raise SourceError(msg, file=str(parent))


@contextlib.contextmanager
def atomic_output(target: Path, *, force: bool = True, durable: bool | None = None) -> Iterator[str]:
    """Yield a temporary file path next to `target`; rename it onto `target` only if the block succeeds.

    Reading the source and writing onto the same path is safe: the source stays intact until the rename.
    `durable` (default: :func:`wants_fsync`) flushes the file and its folder around the rename.
    """
    target = Path(target)
    _check_target(target, force, want_dir=False)
    if durable is None:
        durable = wants_fsync(target)
    tmp = _make_temp_file(target)
    try:
        yield tmp
        os.chmod(tmp, _default_mode(target, 0o666))
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, target)
        if durable:
            _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(target: Path, *, force: bool = True, durable: bool | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; swap it into place only if the block succeeds."""
    target = Path(target)
    _check_target(target, force, want_dir=True)
    if durable is None:
        durable = wants_fsync(target)
    try:
        tmp = _make_temp_dir(target)
    except OSError as exc:
        msg = f"cannot create the output folder: {exc.strerror or exc}"
        raise OutputWriteError(msg, file=str(target)) from exc
    try:
        yield tmp
        os.chmod(tmp, _default_mode(target, 0o777))
        if durable:
            _fsync_tree(tmp)
        if target.exists():
            old = _make_temp_dir(target, ".old")
            os.rmdir(old)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            _rmtree(old)
        else:
            os.replace(tmp, target)
        if durable:
            _fsync_dir(target.parent)
    except OSError as exc:
        _rmtree(tmp)
        if isinstance(exc, LorafmtError):
            raise
        msg = f"writing failed, nothing was written: {exc.strerror or exc}"
        raise OutputWriteError(msg, file=str(target)) from exc
    except BaseException:
        _rmtree(tmp)
        raise


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
