"""Progress bars for long operations, silent unless the caller asks for them.

The library never prints: :func:`progress` returns the iterable untouched unless progress display was switched
on with :func:`progress_enabled` (the CLI does that, unless ``--quiet``) *and* stderr is a terminal. The bar is
drawn with tqdm when installed, else rich, else not at all.

Example:
    >>> from lorafmt.progress import progress, progress_enabled
    >>> list(progress(range(3), total=3, desc="fusing"))  # silent: not enabled
    [0, 1, 2]
    >>> with progress_enabled():  # what the CLI does; draws only on a TTY
    ...     total = sum(progress(range(3), desc="converting"))
    >>> total
    3
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TextIO, TypeVar

__all__ = ["progress", "progress_enabled", "is_enabled"]

T = TypeVar("T")

_ENABLED: ContextVar[bool] = ContextVar("lorafmt_progress", default=False)
_STREAM: ContextVar[TextIO | None] = ContextVar("lorafmt_progress_stream", default=None)
_FORCE: ContextVar[bool] = ContextVar("lorafmt_progress_force", default=False)


@contextlib.contextmanager
def progress_enabled(enabled: bool = True, *, stream: TextIO | None = None, force: bool = False) -> Iterator[None]:
    """Switch progress bars on (or off) for the code inside the block.

    Args:
        enabled: show bars (still only on a terminal).
        stream: where to draw (default: ``sys.stderr`` at the time a bar starts).
        force: draw even when the stream is not a terminal (tests, logs that want it).
    """
    tokens = [_ENABLED.set(bool(enabled)), _STREAM.set(stream)]
    forced = _FORCE.set(force)
    try:
        yield
    finally:
        _FORCE.reset(forced)
        _STREAM.reset(tokens[1])
        _ENABLED.reset(tokens[0])


def is_enabled() -> bool:
    """True when a bar would be drawn now (switched on, and the stream is a TTY or forced)."""
    if not _ENABLED.get():
        return False
    stream = _STREAM.get() or sys.stderr
    if _FORCE.get():
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap `iterable` in a progress bar when enabled (see module docs); otherwise return it unchanged.

    Args:
        iterable: what to iterate.
        total: number of items, when ``len(iterable)`` does not say.
        desc: a short label (``"fusing"``, ``"validate"``).
        unit: what one item is (``"file"``, ``"tensor"``).
    """
    if not is_enabled():
        return iterable
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    stream = _STREAM.get() or sys.stderr
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _rich(iterable, total, desc, stream)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True)


def _rich(iterable: Iterable[T], total: int | None, desc: str | None, stream: Any) -> Iterable[T]:
    try:
        from rich.console import Console
        from rich.progress import track
    except ImportError:
        return iterable
    return track(iterable, total=total, description=desc or "", console=Console(file=stream), transient=True)
