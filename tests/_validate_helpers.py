"""Builders of small real .safetensors LoRA files for the validation tests (written with the safetensors package)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from lorafmt import architectures
from lorafmt.naming.kohya_names import flatten

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"

# Module-name endings a typical LoRA trains, per kind of component.
ATTENTION_TARGETS = (
    ".to_q",
    ".to_k",
    ".to_v",
    ".to_out.0",
    ".add_q_proj",
    ".add_k_proj",
    ".add_v_proj",
    ".to_add_out",
    ".q_proj",
    ".k_proj",
    ".v_proj",
    ".out_proj",
    ".proj_in",
    ".proj_out",
    ".SelfAttention.q",
    ".SelfAttention.v",
)

_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def factors(shape: tuple[int, ...], rank: int, rng: np.random.Generator | None, dtype=np.float16):
    """(down, up) for a weight of ``shape``: down (r, in[, kh, kw]), up (out, r[, 1, 1]); small random or zeros."""
    out, inp, *kernel = shape
    down_shape = (rank, inp, *kernel)
    up_shape = (out, rank, *([1] * len(kernel)))
    if rng is None:
        return np.zeros(down_shape, dtype), np.zeros(up_shape, dtype)
    down = (rng.standard_normal(down_shape) * 0.05).astype(dtype)
    up = (rng.standard_normal(up_shape) * 0.05).astype(dtype)
    return down, up


def family_lora_paths(family: str, variant: str | None = None, limit_per_component: int | None = None) -> list[str]:
    """The attention projections (and the like) of every component of a family variant, as a LoRA trains them."""
    arch = architectures.load(family, variant)
    chosen: list[str] = []
    per_component: dict[str, int] = {}
    for path, spec in arch.modules.items():
        if spec.kind not in ("linear", "conv2d") or not path.endswith(ATTENTION_TARGETS):
            continue
        component = path.split(".", 1)[0]
        if limit_per_component is not None and per_component.get(component, 0) >= limit_per_component:
            continue
        per_component[component] = per_component.get(component, 0) + 1
        chosen.append(path)
    return chosen


def write_diffusers(
    path: Path,
    modules: dict[str, tuple[np.ndarray, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> Path:
    """A diffusers-layout file: ``<component>.<module>.lora_A.weight`` (down) / ``.lora_B.weight`` (up)."""
    tensors = {}
    for module, (down, up) in modules.items():
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(down)
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(up)
    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_name(canonical: str) -> str:
    component, rel = canonical.split(".", 1)
    return f"{_KOHYA_PREFIX[component]}_{flatten(rel)}"


def write_kohya(
    path: Path,
    modules: dict[str, tuple[np.ndarray | None, np.ndarray | None, float | None]],
    extra: dict[str, np.ndarray] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A kohya-layout file from canonical paths (or raw kohya names): lora_down / lora_up / alpha per module."""
    tensors: dict[str, np.ndarray] = {}
    for module, (down, up, alpha) in modules.items():
        name = module if module.startswith("lora_") else kohya_name(module)
        if down is not None:
            tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(down)
        if up is not None:
            tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(up)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32)
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


def family_lora_file(
    tmp_path: Path,
    family: str,
    variant: str | None = None,
    *,
    rank: int = 2,
    limit_per_component: int | None = 24,
    seed: int | None = None,
) -> Path:
    """A diffusers-layout LoRA over ``family``'s attention projections (zeros unless ``seed`` is given)."""
    rng = None if seed is None else np.random.default_rng(seed)
    arch = architectures.load(family, variant)
    modules = {
        p: factors(arch.modules[p].weight_shape, rank, rng)
        for p in family_lora_paths(family, variant, limit_per_component)
    }
    return write_diffusers(tmp_path / f"{family}-{variant or 'default'}.safetensors", modules)


def write_sparse_zeros(path: Path, shapes: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None) -> Path:
    """A valid safetensors file whose tensors are all zeros, written as a sparse file (no data is written)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
    for key, (dtype, shape) in shapes.items():
        n = int(np.prod(shape)) * sizes[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    return path


def manifest_to_file(manifest: Path, out: Path) -> Path | None:
    """Write a corpus key/shape manifest as a real file for header-only checks: a sparse file of zeros.

    Unlike ``fixtures.manifests.manifest_to_safetensors`` (real bytes, meaningful values; use it when values
    matter) this writes no tensor data, so the multi-GB Flux manifests cost nothing. Alpha scalars are 8. Returns
    None when the manifest lacks shapes.
    """
    doc = json.loads(manifest.read_text())
    metadata = {str(k): str(v) for k, v in (doc.get("metadata") or {}).items()} or None
    if any(info.get("shape") is None for info in doc["tensors"].values()):
        return None
    alphas = {
        key: np.full(info["shape"], 8.0, dtype=np.float32)
        for key, info in doc["tensors"].items()
        if info["shape"] == [] or (key.endswith(".alpha") and int(np.prod(info["shape"])) == 1)
    }
    shapes = {
        k: ("F32", info["shape"]) if k in alphas else (info.get("dtype") or "F16", info["shape"])
        for k, info in doc["tensors"].items()
    }
    write_sparse_zeros(out, shapes, metadata)
    _patch_values(out, alphas)
    return out


def _patch_values(path: Path, values: dict[str, np.ndarray]) -> None:
    """Write ``values`` into their slots of an existing safetensors file (same dtype and shape)."""
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        for key, array in values.items():
            start = header[key]["data_offsets"][0]
            fh.seek(8 + n + start)
            fh.write(np.ascontiguousarray(array, dtype="<f4").tobytes())


def corpus_manifests(pattern: str = "*.json") -> Iterable[Path]:
    return sorted((CORPUS / "real").glob(pattern))
