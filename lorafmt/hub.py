"""Hugging Face Hub paths: ``hf://owner/repo/path/file.safetensors[@revision]`` wherever a path is accepted.

Files resolve through huggingface_hub's own cache (``hf_hub_download``), so a file downloaded once is reused by
every tool that uses the cache, and the usual environment is honoured *at call time*: ``HF_HOME`` /
``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE=1`` (never touch the network: the cached file or an
error), ``HF_TOKEN`` (private repos, via huggingface_hub). The revision is a branch, tag or commit (default
``main``); it can also follow the repo name, as in huggingface_hub's own ``hf://owner/repo@rev/file`` spelling.
Dataset and Space repos are spelled ``hf://datasets/owner/repo/...`` and ``hf://spaces/owner/repo/...``.

Header-only commands (``inspect``, ``detect``) fetch only what they read when the file is not cached yet:
the 8-byte length and the JSON header, plus any one-element tensors (kohya ``alpha`` scalars), through ranged
reads on :class:`huggingface_hub.HfFileSystem`. When that would take many requests, or the file is small, the
whole file is downloaded into the cache instead. Anything that needs tensor data downloads the file.

Example:
    >>> import lorafmt
    >>> lorafmt.inspect("hf://owner/pixel-lora/pixel_xl.safetensors@v1.0")["family"]  # doctest: +SKIP
    'sdxl'
    >>> from lorafmt.hub import parse_hub_url
    >>> parse_hub_url("hf://owner/repo/sub/file.safetensors@v2")
    HubPath(repo_id='owner/repo', filename='sub/file.safetensors', revision='v2', repo_type='model')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from lorafmt.errors import SourceError

__all__ = ["HubPath", "parse_hub_url", "is_hub_url", "hub_download", "hub_cached_path", "hub_header_source", "open_hub_source", "HUB_PREFIX"]

HUB_PREFIX = "hf://"
_REPO_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}
#: Header-only reads fall back to a full download above this many separate ranged requests.
MAX_RANGED_REQUESTS = 32
#: ... or when the file is smaller than this (one download is then cheaper than several requests).
MIN_RANGED_FILE_BYTES = 4 << 20


@dataclass(frozen=True)
class HubPath:
    """A parsed ``hf://`` URL."""

    repo_id: str
    filename: str
    revision: str = "main"
    repo_type: str = "model"

    @property
    def url(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"{HUB_PREFIX}{prefix}{self.repo_id}/{self.filename}{rev}"

    @property
    def fs_path(self) -> str:
        """The path :class:`huggingface_hub.HfFileSystem` uses (``owner/repo@rev/file``)."""
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{prefix}{self.repo_id}@{quote(self.revision, safe='')}/{self.filename}"


def is_hub_url(src: Any) -> bool:
    return isinstance(src, str) and src.startswith(HUB_PREFIX)


def parse_hub_url(url: str) -> HubPath:
    """Split ``hf://[datasets/|spaces/]owner/repo[@rev]/path/file[@rev]`` into its parts.

    Raises:
        SourceError: not an ``hf://`` URL, or no file path in it.
    """
    if not is_hub_url(url):
        raise SourceError("not a Hugging Face Hub URL (hf://owner/repo/file.safetensors)", file=str(url))
    rest = url[len(HUB_PREFIX) :]
    repo_type = "model"
    first, _, tail = rest.partition("/")
    if first in _REPO_TYPES:
        repo_type = _REPO_TYPES[first]
        rest = tail
    parts = rest.split("/")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        raise SourceError("a hub path needs owner/repo/file, e.g. hf://owner/repo/lora.safetensors", file=url)
    owner, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        revision = unquote(revision)
    filename = "/".join(parts[2:])
    if revision is None and "@" in filename:
        filename, revision = filename.rsplit("@", 1)
    if not filename or filename.endswith("/"):
        raise SourceError("a hub path needs a file inside the repo", file=url)
    return HubPath(repo_id=f"{owner}/{repo}", filename=filename, revision=revision or "main", repo_type=repo_type)


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _env_cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _silent_tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of huggingface_hub
        return None

    from lorafmt.progress import is_enabled

    if is_enabled():
        return tqdm

    class _Silent(tqdm):  # the library never prints unless the caller switched progress on
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


def hub_cached_path(hub: HubPath | str) -> str | None:
    """The local path of the file in the huggingface_hub cache, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    hp = parse_hub_url(hub) if isinstance(hub, str) else hub
    found = try_to_load_from_cache(hp.repo_id, hp.filename, cache_dir=_env_cache_dir(), revision=hp.revision, repo_type=hp.repo_type)
    return found if isinstance(found, str) else None


def hub_download(hub: HubPath | str) -> str:
    """Resolve a hub file to a local path through the huggingface_hub cache (downloading it unless offline).

    Raises:
        SourceError: offline and not cached, the repo/file/revision does not exist, or the network failed.
    """
    hp = parse_hub_url(hub) if isinstance(hub, str) else hub
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise SourceError("hub paths need huggingface_hub", file=hp.url, hint="pip install huggingface_hub") from None
    offline = _env_offline()
    try:
        return hf_hub_download(
            hp.repo_id,
            hp.filename,
            revision=hp.revision,
            repo_type=hp.repo_type,
            cache_dir=_env_cache_dir(),
            local_files_only=offline,
            tqdm_class=_silent_tqdm(),
            library_name="lorafmt",
        )
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set and the file is not in the cache" if offline else "the file is not in the cache and the hub could not be reached"
        raise SourceError(why, file=hp.url, hint=f"cache: {_env_cache_dir() or 'the huggingface_hub default'}") from None
    except GatedRepoError:
        raise SourceError("the repo is gated: accept its terms on the hub and log in (HF_TOKEN)", file=hp.url) from None
    except RepositoryNotFoundError:
        raise SourceError("no such repo (or it is private: set HF_TOKEN)", file=hp.url) from None
    except RevisionNotFoundError:
        raise SourceError(f"no revision {hp.revision!r} in the repo", file=hp.url) from None
    except EntryNotFoundError:
        raise SourceError("no such file in the repo at that revision", file=hp.url) from None
    except OSError as exc:
        raise SourceError(f"download failed: {exc}", file=hp.url) from None


def _ranges(infos: list[Any], gap: int = 1 << 16) -> list[tuple[int, int]]:
    """Merge the byte ranges of small tensors that lie close together into few requests."""
    spans = sorted((i.start, i.end) for i in infos)
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def hub_header_source(hub: HubPath | str, *, fs: Any = None):
    """A header-level :class:`~lorafmt.io.source.Source` for a hub file, read with ranged requests.

    Only the header and the one-element tensors are fetched; the other tensors know their shape and dtype but
    hold no data (reading one raises). Returns None when ranged reads are not worth it or not possible (then
    download the file).

    Args:
        fs: an fsspec filesystem addressing ``HubPath.fs_path`` (default: a new ``HfFileSystem``).
    """
    import struct

    from lorafmt.io.safetensors_io import MAX_HEADER_BYTES, parse_header, sniff_container
    from lorafmt.io.source import Source
    from lorafmt.schema import TensorRef

    hp = parse_hub_url(hub) if isinstance(hub, str) else hub
    if _env_offline():
        return None
    try:
        if fs is None:
            from huggingface_hub import HfFileSystem

            fs = HfFileSystem()
        size = int(fs.info(hp.fs_path)["size"])
        if size < MIN_RANGED_FILE_BYTES:
            return None
        head = fs.cat_file(hp.fs_path, start=0, end=8)
        sniff_container(hp.url, head, size)
        (n,) = struct.unpack("<Q", head[:8])
        if n > min(MAX_HEADER_BYTES, size - 8):
            return None  # let the full read report the broken header precisely
        raw = fs.cat_file(hp.fs_path, start=8, end=8 + n)
        header = parse_header(hp.url, raw, data_start=8 + n, file_size=size)
        small = [i for i in header.tensors.values() if i.nbytes <= 64 and i.shape in ((), (1,))]
        small_keys = {i.key for i in small}
        ranges = _ranges(small)
        if len(ranges) > MAX_RANGED_REQUESTS:
            return None
        blobs = {(a, b): fs.cat_file(hp.fs_path, start=a, end=b) for a, b in ranges}
    except SourceError:
        raise
    except Exception:  # noqa: BLE001 - no ranged reads (old hub, proxy, auth): fall back to the download
        return None
    import numpy as np

    from lorafmt.dtypes import numpy_dtype

    tensors = {}
    for key, info in header.tensors.items():
        if key in small_keys:
            a, b = next(r for r in ranges if r[0] <= info.start and info.end <= r[1])
            data = blobs[(a, b)][info.start - a : info.end - a]
            arr = np.frombuffer(data, dtype=numpy_dtype(info.dtype)).reshape(info.shape)
            tensors[key] = TensorRef.from_raw(key, info.dtype, arr)
        else:
            tensors[key] = TensorRef(key=key, dtype=info.dtype, shape=info.shape, file=None, offset=None)
    return Source(path=hp.url, kind="file", tensors=tensors, metadata=dict(header.metadata))


def open_hub_source(url: str, *, header_only: bool = False):
    """The :class:`~lorafmt.io.source.Source` for a hub URL: the cached file, a ranged header read (when
    `header_only` and not cached), or the downloaded file."""
    from lorafmt.io.source import _file_source

    hp = parse_hub_url(url)
    cached = hub_cached_path(hp)
    if cached is None and header_only:
        remote = hub_header_source(hp)
        if remote is not None:
            return remote
    return _file_source(cached or hub_download(hp))
