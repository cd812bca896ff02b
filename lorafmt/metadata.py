"""safetensors metadata done right: kohya ``ss_*`` and ``modelspec.*`` keys read and typed, refreshed when a
conversion makes them stale, and the weights-only hashes recomputed after writing.

* :class:`KnownMetadata` — the typed view (architecture, title, trigger words, resolution, network
  module/dim/alpha/args, base model version, hashes, ...). Values that do not parse are kept out of the typed
  fields and listed in ``problems``; the raw metadata itself is never changed by reading.
* :func:`refresh_metadata` — before writing: rewrite the keys a conversion makes stale (``modelspec.architecture``
  and ``.implementation``, ``ss_base_model_version``, ``ss_v2``, ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``) and drop
  the hash keys, whose values belong to the old bytes. Keys that were absent are not invented.
* :func:`recompute_hashes` / :func:`update_file_hashes` — after writing: the hashes of the new file.

Hash definitions (formats.md §3.1; sd-scripts ``train_util.precalculate_safetensors_hashes``,
``addnet_hash_safetensors``, ``addnet_hash_legacy``): both hashes are taken over the file as
``safetensors.save(tensors, metadata={only ss_* keys})`` would serialise it — tensors ordered by dtype (widest
first) then name, header padded to 8 bytes — so they do not change when other metadata is edited:

* ``sshs_model_hash``: sha256 (hex) of the bytes after the header, i.e. of the tensor data.
* ``sshs_legacy_hash``: first 8 hex digits of the sha256 of bytes ``0x100000..0x110000`` of that serialisation
  (for files under 1 MiB that range is empty and the value is ``e3b0c442``).
* ``modelspec.hash_sha256``: the same weights-only sha256 as ``sshs_model_hash``, written ``0x``-prefixed as the
  ModelSpec examples do (an existing value without the prefix keeps that style).

Everything streams the tensor bytes from disk in 1 MiB chunks; nothing is decoded.

Example:
    >>> from lorafmt.metadata import KnownMetadata
    >>> km = KnownMetadata.from_metadata({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    ...     "modelspec.trigger_phrase": "pxl art, pixel", "ss_network_dim": "16", "ss_network_alpha": "8.0",
    ...     "modelspec.resolution": "1024x1024"})
    >>> km.family, km.trigger_words, km.network_dim, km.network_alpha, km.resolution
    ('sdxl', ['pxl art', 'pixel'], 16, 8.0, (1024, 1024))
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping

from lorafmt._record import Factory
from lorafmt.schema import SchemaModel

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "KnownMetadata",
    "HASH_KEYS",
    "refresh_metadata",
    "recompute_hashes",
    "update_file_hashes",
    "fresh_hashes",
    "entry_hashes",
    "kohya_hashes",
    "weights_sha256",
    "architecture_id",
]

HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")

# modelspec.architecture ids per family (sd-scripts sai_model_spec.determine_architecture).
_ARCH_BY_FAMILY = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sd3": "stable-diffusion-3-medium",
    "flux1": "flux-1-dev",
}
_ARCH_PREFIX_BY_FAMILY = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2",
    "sdxl": "stable-diffusion-xl",
    "sd3": "stable-diffusion-3",
    "flux1": "flux-1",
}
# ss_base_model_version per family (sd-scripts model_util / sdxl_model_util / flux_utils).
_BASE_VERSION_BY_FAMILY = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "medium", "flux1": "flux1"}
_NETWORK_MODULE = {"sd1": "networks.lora", "sd2": "networks.lora", "sdxl": "networks.lora", "sd3": "networks.lora_sd3", "flux1": "networks.lora_flux"}
# modelspec.implementation per family (sd-scripts sai_model_spec.determine_implementation).
_IMPLEMENTATION_BY_FAMILY = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "flux1": "https://github.com/black-forest-labs/flux",
}
_LYCORIS_ALGOS = {"loha", "lokr", "full", "norm", "ia3", "oft", "boft"}


# ------------------------------------------------------------------------------------------- typed view


def _split_list(raw: str) -> list[str]:
    raw = raw.strip()
    if raw.startswith("["):
        try:
            value = json.loads(raw)
            if isinstance(value, list):
                return [str(v).strip() for v in value if str(v).strip()]
        except json.JSONDecodeError:
            pass
    return [part.strip() for part in raw.split(",") if part.strip()]


def _resolution(raw: str) -> tuple[int, int]:
    """``1024x1024``, ``(512, 512)``, ``[768, 512]``, ``512`` -> (width, height)."""
    s = raw.strip()
    m = re.fullmatch(r"(\d+)\s*[xX*]\s*(\d+)", s)
    if m:
        return int(m.group(1)), int(m.group(2))
    if re.fullmatch(r"\d+", s):
        return int(s), int(s)
    import ast

    value = ast.literal_eval(s)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(raw)


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no", "none", ""):
        return False
    raise ValueError(raw)


def _float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _int(raw: str) -> int:
    value = float(raw)
    if not value.is_integer():
        raise ValueError(raw)
    return int(value)


def _json(raw: str) -> Any:
    return json.loads(raw)


def _json_object(raw: str) -> dict[str, Any]:
    value = json.loads(raw) if raw.strip() not in ("", "None") else {}
    if not isinstance(value, dict):
        raise ValueError(raw)
    return value


class KnownMetadata(SchemaModel):
    """The typed view of the metadata keys trainers and UIs agree on (kohya ``ss_*``, ``sshs_*``, ModelSpec).

    Build it with :meth:`from_metadata`; fields are None when the key is absent or unparseable.
    """

    # ModelSpec (sai_model_spec)
    sai_model_spec: str | None = None
    """modelspec.sai_model_spec (spec version)."""
    architecture: str | None = None
    """modelspec.architecture, e.g. stable-diffusion-xl-v1-base/lora."""
    implementation: str | None = None
    title: str | None = None
    """modelspec.title, else ss_output_name."""
    description: str | None = None
    author: str | None = None
    date: str | None = None
    license: str | None = None
    tags: list[str] = Factory(list)
    trigger_words: list[str] = Factory(list)
    """modelspec.trigger_phrase, split on commas."""
    resolution: tuple[int, int] | None = None
    """(width, height) from modelspec.resolution or ss_resolution."""
    prediction_type: str | None = None
    # kohya training keys
    network_module: str | None = None
    """ss_network_module, e.g. networks.lora, lycoris.kohya."""
    network_dim: int | None = None
    network_alpha: float | None = None
    network_args: dict[str, Any] = Factory(dict)
    """ss_network_args (JSON)."""
    base_model_version: str | None = None
    """ss_base_model_version, e.g. sd_v1, sdxl_base_v1-0."""
    v2: bool | None = None
    sd_model_name: str | None = None
    output_name: str | None = None
    clip_skip: int | None = None
    steps: int | None = None
    epoch: int | None = None
    learning_rate: float | None = None
    training_started_at: float | None = None
    training_finished_at: float | None = None
    tag_frequency: dict[str, Any] = Factory(dict)
    """ss_tag_frequency (JSON): dataset -> tag -> count."""
    # hashes
    model_hash: str | None = None
    """sshs_model_hash."""
    legacy_hash: str | None = None
    """sshs_legacy_hash."""
    hash_sha256: str | None = None
    """modelspec.hash_sha256."""
    # other writers
    software: dict[str, Any] = Factory(dict)
    """ai-toolkit's `software` (JSON)."""
    family: str | None = None
    """The family the metadata claims (sd1, sd2, sdxl, sd3, flux1)."""
    problems: list[str] = Factory(list)
    """Keys whose values did not parse, with why."""

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> KnownMetadata:
        """Parse a safetensors metadata map; never raises for bad values (see ``problems``)."""
        from lorafmt.families import family_from_metadata

        out: dict[str, Any] = {}
        problems: list[str] = []

        def take(field: str, key: str, parse=str) -> None:
            raw = metadata.get(key)
            if raw is None or field in out:
                return
            try:
                out[field] = parse(raw)
            except (ValueError, TypeError, SyntaxError, json.JSONDecodeError, RecursionError) as exc:
                problems.append(f"{key}: cannot parse {raw[:60]!r} ({type(exc).__name__})")

        take("sai_model_spec", "modelspec.sai_model_spec")
        take("architecture", "modelspec.architecture")
        take("implementation", "modelspec.implementation")
        take("title", "modelspec.title")
        take("title", "ss_output_name")
        take("description", "modelspec.description")
        take("author", "modelspec.author")
        take("date", "modelspec.date")
        take("license", "modelspec.license")
        take("tags", "modelspec.tags", _split_list)
        take("trigger_words", "modelspec.trigger_phrase", _split_list)
        take("resolution", "modelspec.resolution", _resolution)
        take("resolution", "ss_resolution", _resolution)
        take("prediction_type", "modelspec.prediction_type")
        take("network_module", "ss_network_module")
        take("network_dim", "ss_network_dim", _int)
        if metadata.get("ss_network_alpha") not in (None, "None", "Dynamic"):
            take("network_alpha", "ss_network_alpha", _float)
        take("network_args", "ss_network_args", _json_object)
        take("base_model_version", "ss_base_model_version")
        take("v2", "ss_v2", _bool)
        take("sd_model_name", "ss_sd_model_name")
        take("output_name", "ss_output_name")
        if metadata.get("ss_clip_skip") not in (None, "None"):
            take("clip_skip", "ss_clip_skip", _int)
        take("steps", "ss_steps", _int)
        take("epoch", "ss_epoch", _int)
        take("learning_rate", "ss_learning_rate", _float)
        take("training_started_at", "ss_training_started_at", _float)
        take("training_finished_at", "ss_training_finished_at", _float)
        take("tag_frequency", "ss_tag_frequency", _json_object)
        take("model_hash", "sshs_model_hash")
        take("legacy_hash", "sshs_legacy_hash")
        take("hash_sha256", "modelspec.hash_sha256")
        take("software", "software", _json_object)
        out["family"] = family_from_metadata(dict(metadata))
        return cls(**out, problems=problems)


# ------------------------------------------------------------------------------------------- refresh


def architecture_id(family: str, suffix: str = "lora", *, current: str | None = None) -> str:
    """The ``modelspec.architecture`` id for `family` (``stable-diffusion-xl-v1-base/lora``).

    A `current` id of the same family is kept (its variant — ``-768-v``, ``-schnell``, ``3.5-large`` — cannot be
    told from the weights).
    """
    prefix = _ARCH_PREFIX_BY_FAMILY.get(family)
    if current and prefix and current.split("/", 1)[0].startswith(prefix):
        base = current.split("/", 1)[0]
    else:
        base = _ARCH_BY_FAMILY.get(family, family)
    return f"{base}/{suffix}" if suffix else base


def _network_numbers(modules: Mapping[str, Any]) -> tuple[int, float] | None:
    """(dim, alpha) as kohya would record them: the most common rank of linear modules, and its most common alpha."""
    ranks: Counter[int] = Counter()
    alphas: dict[int, Counter[float]] = {}
    for m in modules.values():
        try:
            rank = m.rank
        except Exception:  # noqa: BLE001 - an algorithm this install does not know: it has no kohya dim
            rank = None
        if not rank:
            continue
        is_conv = any(len(t.shape) == 4 and t.shape[2:] != (1, 1) for t in m.tensors.values())
        if is_conv:
            continue
        ranks[rank] += 1
        alpha = float(m.alpha) if m.alpha is not None else float(rank)
        alphas.setdefault(rank, Counter())[alpha] += 1
    if not ranks:
        return None
    dim = max(ranks.items(), key=lambda kv: (kv[1], kv[0]))[0]
    alpha = max(alphas[dim].items(), key=lambda kv: (kv[1], kv[0]))[0]
    return dim, alpha


def _same_number(raw: str | None, value: float) -> bool:
    try:
        return raw is not None and math.isclose(float(raw), value, rel_tol=1e-6, abs_tol=1e-9)
    except ValueError:
        return False


def refresh_metadata(
    metadata: Mapping[str, str],
    *,
    target_layout: str | None = None,
    family: str | None = None,
    modules: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The metadata to write after a conversion: stale keys rewritten, hash keys dropped, the rest verbatim.

    Args:
        metadata: the source's safetensors metadata.
        target_layout: the layout being written (``ss_network_module`` is rewritten for ``kohya`` only).
        family: the LoRA's family; ``modelspec.architecture``, ``ss_base_model_version`` and ``ss_v2`` follow it.
        modules: the canonical modules being written; ``ss_network_dim``/``ss_network_alpha`` follow their
            ranks and alphas (most common linear rank, and its most common alpha).

    Only keys already present are rewritten, and a value that is still right keeps its spelling. The hash keys
    (:data:`HASH_KEYS`) are removed: recompute them from the written file with :func:`update_file_hashes`.

    Example:
        >>> refresh_metadata({"modelspec.architecture": "stable-diffusion-v1/lora", "ss_network_dim": "8",
        ...                   "ss_network_alpha": "8.0", "sshs_model_hash": "ab12", "ss_output_name": "x"},
        ...                  target_layout="diffusers", family="sdxl")
        {'modelspec.architecture': 'stable-diffusion-xl-v1-base/lora', 'ss_network_dim': '8', 'ss_network_alpha': '8.0', 'ss_output_name': 'x'}
    """
    out = {k: v for k, v in metadata.items() if k not in HASH_KEYS}
    if family:
        arch = out.get("modelspec.architecture")
        if arch is not None:
            base, _, suffix = arch.partition("/")
            out["modelspec.architecture"] = architecture_id(family, suffix or "lora", current=arch)
            changed = out["modelspec.architecture"].split("/", 1)[0] != base
            if changed and "modelspec.implementation" in out and family in _IMPLEMENTATION_BY_FAMILY:
                out["modelspec.implementation"] = _IMPLEMENTATION_BY_FAMILY[family]
        version = out.get("ss_base_model_version")
        if version is not None:
            from lorafmt.families import family_from_metadata

            if family_from_metadata({"ss_base_model_version": version}) != family:
                out["ss_base_model_version"] = _BASE_VERSION_BY_FAMILY.get(family, version)
        if "ss_v2" in out and family in ("sd1", "sd2", "sdxl"):
            want = family == "sd2"
            try:
                stale = _bool(out["ss_v2"]) != want
            except ValueError:
                stale = True
            if stale:
                out["ss_v2"] = str(want)
    if modules:
        algos = {getattr(m, "algorithm", "lora") for m in modules.values()}
        if "ss_network_module" in out and (target_layout in (None, "kohya", "a1111")):
            if algos & _LYCORIS_ALGOS:
                want_module = "lycoris.kohya"
            else:
                want_module = _NETWORK_MODULE.get(family or "", out["ss_network_module"])
            current = out["ss_network_module"]
            if current != want_module and not (want_module == "networks.lora" and current.startswith("networks.")):
                out["ss_network_module"] = want_module
        numbers = _network_numbers(modules)
        if numbers is not None:
            dim, alpha = numbers
            if "ss_network_dim" in out and not _same_number(out["ss_network_dim"], dim):
                out["ss_network_dim"] = str(dim)
            if "ss_network_alpha" in out and out["ss_network_alpha"] != "Dynamic" and not _same_number(out["ss_network_alpha"], alpha):
                out["ss_network_alpha"] = str(float(alpha))
    return out


# ------------------------------------------------------------------------------------------- hashes

_CHUNK = 1 << 20
_LEGACY_START, _LEGACY_LEN = 0x100000, 0x10000

# safetensors orders tensors by dtype, descending in its Rust enum order (then by name).
_DTYPE_RANK = {
    name: i
    for i, name in enumerate(
        ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
         "I32", "U32", "F32", "F64", "I64", "U64", "C64"]
    )
}


def _nbytes(t: Any) -> int:
    return t.size if hasattr(t, "size") else t.nbytes  # WriteEntry (bytes may be in memory) or TensorInfo


def _canonical_order(tensors: Iterable[Any]) -> list[Any]:
    return sorted(tensors, key=lambda t: (-_DTYPE_RANK.get(t.dtype, -1), t.key))


def kohya_hashes(path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) of a safetensors file, exactly as sd-scripts computes them
    (over ``safetensors.save(tensors, {ss_* keys})``), streaming from disk.

    `metadata` defaults to the file's own; only its ``ss_*`` keys matter.
    """
    from lorafmt.io.safetensors_io import WriteEntry, read_header

    header = read_header(path)
    meta = header.metadata if metadata is None else metadata
    entries = [
        WriteEntry(i.key, i.dtype, i.shape, src_path=header.path, src_offset=i.start, nbytes=i.nbytes)
        for i in header.tensors.values()
    ]
    return entry_hashes(entries, meta)


def entry_hashes(entries: Iterable[Any], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) of the file these write entries would make, before it is
    written: a conversion stores fresh hashes in the one pass that writes its output.

    Each entry is a :class:`lorafmt.io.safetensors_io.WriteEntry` (bytes in memory, or a range of a source file).
    """
    import hashlib

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    order = _canonical_order(entries)
    head = _canonical_header_bytes(order, ss)
    model = hashlib.sha256()
    legacy = hashlib.sha256()
    lo, hi = _LEGACY_START, _LEGACY_START + _LEGACY_LEN
    if lo < len(head):
        # the legacy window starts inside the header (metadata order there is unspecified upstream)
        legacy.update(head[lo:hi])
    pos = len(head)  # absolute position in the canonical serialisation
    buffer = memoryview(bytearray(_CHUNK))
    sources: dict[str, Any] = {}
    try:
        for e in order:
            if e.data is not None:
                chunks: Iterable[memoryview] = [memoryview(e.data).cast("B")]
            else:
                fh = sources.get(e.src_path)
                if fh is None:
                    fh = sources[e.src_path] = open(e.src_path, "rb")  # noqa: SIM115 - closed below
                chunks = _read_range(fh, e.src_offset, e.nbytes, buffer, e.key)
            for chunk in chunks:
                model.update(chunk)
                a, b = max(lo, pos), min(hi, pos + len(chunk))
                if a < b:
                    legacy.update(chunk[a - pos : b - pos])
                pos += len(chunk)
    finally:
        for fh in sources.values():
            fh.close()
    return model.hexdigest(), legacy.hexdigest()[:8]


def fresh_hashes(entries: Iterable[Any], metadata: Mapping[str, str], stale: Mapping[str, str]) -> dict[str, str]:
    """New values for the hash keys in `stale` (a source's hash entries) for the file that `entries` and
    `metadata` will make; ``modelspec.hash_sha256`` keeps the stale value's ``0x`` spelling."""
    model, legacy = entry_hashes(entries, metadata)
    existing = stale.get("modelspec.hash_sha256")
    prefix = "" if existing and not existing.lower().startswith("0x") else "0x"
    values = {"sshs_model_hash": model, "sshs_legacy_hash": legacy, "modelspec.hash_sha256": prefix + model}
    return {k: values[k] for k in stale if k in values}


def _read_range(fh, start: int, count: int, buffer: memoryview, key: str) -> Iterable[memoryview]:
    fh.seek(start)
    while count > 0:
        got = fh.readinto(buffer[: min(len(buffer), count)])
        if not got:
            from lorafmt.errors import TruncatedFileError

            raise TruncatedFileError(f"file ended {count} bytes early", file=getattr(fh, "name", None), key=key)
        count -= got
        yield buffer[:got]


def _canonical_header_bytes(order: list[Any], ss: Mapping[str, str]) -> bytes:
    obj: dict[str, Any] = {"__metadata__": dict(sorted(ss.items()))}
    offset = 0
    for t in order:
        size = _nbytes(t)
        obj[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of the tensor data of a safetensors file in safetensors' canonical order (= ``sshs_model_hash``)."""
    return kohya_hashes(path, {})[0]


def recompute_hashes(path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """The hash keys for the safetensors file at `path`: ``sshs_model_hash``, ``sshs_legacy_hash``,
    ``modelspec.hash_sha256`` (``0x``-prefixed; without the prefix when `metadata` has it that way).

    Example:
        >>> recompute_hashes("out.safetensors")["sshs_legacy_hash"]  # doctest: +SKIP
        'e3b0c442'
    """
    from lorafmt.io.safetensors_io import read_header

    meta = read_header(path).metadata if metadata is None else metadata
    model, legacy = kohya_hashes(path, meta)
    existing = meta.get("modelspec.hash_sha256")
    prefix = "" if existing and not existing.lower().startswith("0x") else "0x"
    return {"sshs_model_hash": model, "sshs_legacy_hash": legacy, "modelspec.hash_sha256": prefix + model}


def update_file_hashes(path: str | os.PathLike, keys: Iterable[str] = HASH_KEYS, *, style: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write fresh hash values for `keys` into the metadata of the safetensors file at `path` (atomically: the
    file is re-written with the new header, tensor bytes copied unchanged). Returns the values written.

    `style` is the source metadata, used to keep the ``0x`` spelling of ``modelspec.hash_sha256``.

    Example:
        >>> update_file_hashes("converted.safetensors", ["sshs_model_hash", "sshs_legacy_hash"])  # doctest: +SKIP
    """
    from lorafmt.io.safetensors_io import WriteEntry, read_header, write_safetensors

    keys = [k for k in keys if k in HASH_KEYS]
    if not keys:
        return {}
    header = read_header(path)
    meta = dict(header.metadata)
    spelled = dict(meta)
    if style and "modelspec.hash_sha256" in style:
        spelled["modelspec.hash_sha256"] = style["modelspec.hash_sha256"]
    fresh = recompute_hashes(path, metadata=spelled)
    values = {k: fresh[k] for k in keys}
    if all(meta.get(k) == v for k, v in values.items()):
        return values
    meta.update(values)
    entries = [
        WriteEntry(info.key, info.dtype, info.shape, src_path=header.path, src_offset=info.start, nbytes=info.nbytes)
        for info in sorted(header.tensors.values(), key=lambda i: i.start)
    ]
    write_safetensors(path, entries, meta, force=True)
    return values
