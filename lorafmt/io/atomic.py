"""Atomic outputs: write to a temporary sibling, fsync, rename into place; clean up on any failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorafmt.errors import LorafmtError, OutputExistsError, OutputWriteError, SourceError

__all__ = ["atomic_output", "atomic_directory"]


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
def atomic_output(target: Path, *, force: bool = True) -> Iterator[str]:
    """Yield a temporary file path next to `target`; rename it onto `target` only if the block succeeds.

    Reading the source and writing onto the same path is safe: the source stays intact until the rename.
    """
    target = Path(target)
    _check_target(target, force, want_dir=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_mode(target, 0o666))
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(target: Path, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; swap it into place only if the block succeeds."""
    target = Path(target)
    _check_target(target, force, want_dir=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        msg = f"cannot create the output folder: {exc.strerror or exc}"
        raise OutputWriteError(msg, file=str(target)) from exc
    try:
        yield tmp
        os.chmod(tmp, _default_mode(target, 0o777))
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, LorafmtError):
            raise
        msg = f"writing failed, nothing was written: {exc.strerror or exc}"
        raise OutputWriteError(msg, file=str(target)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
