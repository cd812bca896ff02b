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

from lorafmt.errors import LorafmtError, OutputExistsError, OutputWriteError, SourceError

TYPE_CHECKING = False  # pathlib and typing cost milliseconds to import; only atomic_directory needs Path
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["atomic_output", "atomic_directory", "wants_fsync", "open_output"]

FSYNC_ENV = "LORAFMT_FSYNC"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(target: str, base: int) -> int:
    """Keep an existing output's permissions; otherwise what open() would give (mkstemp makes 0600)."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        return base & ~_umask()


def _clean(target: str | os.PathLike) -> str:
    # Plain strings, not pathlib (a few ms of imports on every command); trailing separators dropped as Path does.
    path = os.fspath(target)
    return path.rstrip("/" + os.sep) or path


def _parent(target: str) -> str:
    return os.path.dirname(target) or "."


def _sibling_name(target: str, suffix: str) -> str:
    # A hidden, unpredictable name next to the target (what tempfile.mkstemp makes, without importing tempfile
    # and shutil on the fast path).
    return os.path.join(_parent(target), f".{os.path.basename(target)}.{os.urandom(6).hex()}{suffix}")


def _make_temp_file(target: str) -> str:
    for _ in range(100):
        path = _sibling_name(target, ".tmp")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    msg = f"no free temporary name next to {target}"
    raise FileExistsError(msg)


def _make_temp_dir(target: str, suffix: str = ".tmp") -> str:
    for _ in range(100):
        path = _sibling_name(target, suffix)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    msg = f"no free temporary name next to {target}"
    raise FileExistsError(msg)


def _rmtree(path: str | os.PathLike) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def open_output(path: str | os.PathLike):
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


def wants_fsync(target: str | os.PathLike) -> bool:
    """Whether an output written to `target` is flushed to disk before it is renamed into place."""
    setting = os.environ.get(FSYNC_ENV, "auto").strip().lower()
    if setting in ("always", "1", "true", "yes", "on"):
        return True
    return os.path.lexists(target)


def _check_target(target: str, force: bool, want_dir: bool) -> None:
    if os.path.lexists(target):
        if not force:
            msg = "output exists; pass --force (force=True) to replace it"
            raise OutputExistsError(msg, file=target)
        is_dir = os.path.isdir(target)
        if want_dir != is_dir:
            kind = "a directory" if is_dir else "a file"
            msg = f"output exists and is {kind}; refusing to replace it with a {'directory' if want_dir else 'file'}"
            raise OutputExistsError(msg, file=target)
    parent = _parent(target)
    if not os.path.isdir(parent):
        msg = "output folder does not exist"
        raise SourceError(msg, file=parent)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, force: bool = True, durable: bool | None = None) -> Iterator[str]:
    """Yield a temporary file path next to `target`; rename it onto `target` only if the block succeeds.

    Reading the source and writing onto the same path is safe: the source stays intact until the rename.
    `durable` (default: :func:`wants_fsync`) flushes the file and its folder around the rename.
    """
    target = _clean(target)
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
            _fsync_dir(_parent(target))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, force: bool = True, durable: bool | None = None) -> Iterator[Path]:
    """Yield a temporary directory (a Path) next to `target`; swap it into place only if the block succeeds."""
    from pathlib import Path  # folder outputs only

    target = _clean(target)
    _check_target(target, force, want_dir=True)
    if durable is None:
        durable = wants_fsync(target)
    try:
        tmp = Path(_make_temp_dir(target))
    except OSError as exc:
        msg = f"cannot create the output folder: {exc.strerror or exc}"
        raise OutputWriteError(msg, file=target) from exc
    try:
        yield tmp
        os.chmod(tmp, _default_mode(target, 0o777))
        if durable:
            _fsync_tree(tmp)
        if os.path.exists(target):
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
            _fsync_dir(_parent(target))
    except OSError as exc:
        _rmtree(tmp)
        if isinstance(exc, LorafmtError):
            raise
        msg = f"writing failed, nothing was written: {exc.strerror or exc}"
        raise OutputWriteError(msg, file=target) from exc
    except BaseException:
        _rmtree(tmp)
        raise


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str | os.PathLike) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            _fsync_file(os.path.join(folder, name))
        _fsync_dir(folder)


def _fsync_dir(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
