"""Fuse LoRAs into base weights, streaming the base checkpoint tensor by tensor.

``fuse(base, [(lora, scale), ...], out)`` writes ``W + Σ scaleᵢ·ΔWᵢ`` for every weight a LoRA touches and
copies every other tensor byte for byte. BASE may be

* a diffusers component file (``unet/diffusion_pytorch_model.safetensors``; the component comes from the
  folder name, the keys, or ``component=``),
* a diffusers pipeline folder (a new folder is written: affected components fused, everything else
  hard-linked or copied), or
* an original single-file SD1.x / SD2.x / SDXL checkpoint (``model.diffusion_model.*``,
  ``cond_stage_model.*``, ``conditioner.embedders.*``; OpenCLIP q/k/v LoRAs land in row blocks of the fused
  ``in_proj_weight``, see :mod:`lorafmt.naming.checkpoint`).

How: the base header is read, every LoRA module is matched to a base tensor (unmatched modules are an error
unless ``allow_unmatched``), shapes are checked, then the output header is written and tensors follow in file
order: one base tensor is read, decoded to float32 on the device (CUDA when present), the LoRA weight changes
are added in LoRA order, the result is cast back to the base dtype, checked finite and written. Peak memory
is about one base tensor (plus its float32 copy) and the LoRA factors. Writes go to a temporary sibling and
are renamed into place only when every fused tensor was finite (``unsafe=True`` skips the check, mirroring
diffusers' ``safe_fusing=False``), so a failure leaves no output and never touches an existing one.

Algorithms other than plain LoRA, and DoRA magnitudes, go through the algorithm registry
(``get_algorithm(m.algorithm)``: ``apply``/``delta``/``bias_delta``); with a DoRA magnitude the strength
blends ``W + s·(DoRA(W, ΔW) − W)`` as A1111/ComfyUI do. Several LoRAs are applied in the order given.

Example:
    >>> import lorafmt
    >>> report = lorafmt.fuse("sd15/unet/diffusion_pytorch_model.safetensors",
    ...                       [("style.safetensors", 0.7), ("detail.safetensors", -0.3)],
    ...                       "fused_unet.safetensors")  # doctest: +SKIP
    >>> len(report.modules_fused), report.unmatched  # doctest: +SKIP
    (264, [])
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from lorafmt.dtypes import FLOAT_DTYPES, from_float32, numpy_dtype, to_float32
from lorafmt.errors import FuseError, MissingExtraError, SourceError, UnsupportedFeatureError
from lorafmt.io.atomic import atomic_directory, atomic_output, open_output
from lorafmt.io.safetensors_io import Header, TensorInfo, WriteEntry, build_header, read_header, reserve_space, write_entries
from lorafmt.naming.checkpoint import CheckpointTarget, checkpoint_family, checkpoint_target
from lorafmt.schema import COMPONENTS, Diagnostic, LoraFile, Module, pydantic_ready

pydantic_ready()  # the reports below hold schema records (Diagnostic, ...) as fields

__all__ = ["fuse", "FuseReport", "LoraUse", "require_torch", "resolve_device", "parse_lora_arg"]

BaseKind = Literal["component", "pipeline", "checkpoint"]

# Float dtypes torch can decode exactly from their safetensors bytes.
_TORCH_FLOATS = ("F16", "BF16", "F32", "F64")


# ------------------------------------------------------------------------------------------- torch


def require_torch():
    """Import torch or raise a one-line :class:`MissingExtraError` naming the extra."""
    try:
        import torch
    except ImportError:
        msg = "this operation needs torch; install it with `pip install \"lorafmt[torch]\"`"
        raise MissingExtraError(msg, hint='pip install "lorafmt[torch]"') from None
    return torch


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def resolve_device(device: str | Any = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error.

    Returns a device string (``cpu``, ``cuda``, ``cuda:1``). Only CUDA needs torch.
    """
    name = str(device or "auto").lower()
    if name == "auto":
        torch = _torch_or_none()
        return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        torch = require_torch()
        if not torch.cuda.is_available():
            msg = "device cuda requested but torch sees no CUDA device"
            raise FuseError(msg, hint="use --device cpu or auto")
        return name
    msg = f"unknown device {device!r}; use auto, cpu or cuda"
    raise FuseError(msg)


def _torch_dtype(torch, dtype: str):
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}[dtype]


def raw_to_torch(torch, raw: np.ndarray, dtype: str):
    """Safetensors-encoded numpy array (bf16 as uint16) -> torch tensor of the real dtype, sharing memory."""
    if dtype == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)


def torch_to_bytes(torch, tensor, dtype: str) -> bytes:
    """A torch tensor -> little-endian safetensors bytes of `dtype`."""
    t = tensor.detach().to(_torch_dtype(torch, dtype)).contiguous().cpu()
    if dtype == "BF16":
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _factor(torch, module: Module, role: str, device):
    ref = module.tensors[role]
    raw = np.array(ref.raw(), copy=True)  # writable, owned
    if ref.dtype in _TORCH_FLOATS:
        return raw_to_torch(torch, raw, ref.dtype).to(device=device, dtype=torch.float32)
    return torch.from_numpy(to_float32(raw, ref.dtype)).to(device)


def lora_delta_torch(torch, module: Module, device, shape: tuple[int, ...]):
    """ΔW of a plain LoRA module (scale included) computed on `device` in float32, shaped `shape`.

    Same arithmetic as :class:`lorafmt.algorithms.lora.LoRA.delta`: ``up @ [mid] @ down`` with k×k conv
    factors flattened over (in, kh, kw).
    """
    down = _factor(torch, module, "down", device)
    up = _factor(torch, module, "up", device)
    up2 = up.reshape(up.shape[0], -1)
    if "mid" in module.tensors:
        mid = _factor(torch, module, "mid", device)
        dw = torch.einsum("ij,jk...,kl->il...", up2, mid, down.reshape(down.shape[0], -1))
    else:
        dw = up2 @ down.reshape(down.shape[0], -1)
    return (dw * module.scale).reshape(shape)


def _algorithm(module: Module):
    from lorafmt.algorithms import get_algorithm

    return get_algorithm(module.algorithm)


def is_plain(module: Module) -> bool:
    """A LoRA module whose effect is ``W + s·ΔW`` with ΔW independent of W (no DoRA, no IA3/OFT)."""
    algo = _algorithm(module)
    return module.dora_scale is None and not getattr(algo, "needs_base", False)


def patch_numpy(weight: np.ndarray, module: Module, scale: float) -> np.ndarray:
    """``weight`` (float32) with one module applied at strength `scale`, in numpy (exact float32 arithmetic).

    ``W + s·ΔW`` for algorithms whose ΔW does not depend on W; otherwise the algorithm's ``apply``, or for
    DoRA ``W + s·(DoRA(W, ΔW) − W)`` (A1111/ComfyUI strength convention).
    """
    shape = tuple(weight.shape)
    algo = _algorithm(module)
    if is_plain(module):
        delta = algo.delta(module, shape)
        # The built-in LoRA returns a fresh array: scale it in place (one tensor-sized buffer, not three).
        fresh = module.algorithm == "lora" and isinstance(delta, np.ndarray) and delta.dtype == np.float32
        out = (delta if fresh else np.array(delta, dtype=np.float32, copy=True)).reshape(shape)
        out *= np.float32(scale)
        out += weight
        return out
    if hasattr(algo, "apply"):
        return np.asarray(algo.apply(module, weight, scale), dtype=np.float32).reshape(shape)
    if module.dora_scale is None:
        msg = f"algorithm {module.algorithm} needs the base weight and this install cannot apply it"
        raise UnsupportedFeatureError(msg, module=module.path)
    try:
        from lorafmt.algorithms.dora import apply_dora
    except ImportError:
        msg = "DoRA modules need lorafmt.algorithms.dora, which this install lacks"
        raise UnsupportedFeatureError(msg, module=module.path) from None
    delta = algo.delta(module, shape).reshape(shape)
    dora = apply_dora(weight, delta, module.dora_scale.float32(), module.dora_axis or "out")
    return weight + np.float32(scale) * (dora - weight)


# Plain-LoRA products are added in row blocks of about this many elements, so a fuse never holds a full-size
# float32 ΔW next to the float32 weight (the weight itself is the only tensor-sized buffer).
ROW_BLOCK_ELEMENTS = 1 << 20


def add_lora_rows(weight: np.ndarray, module: Module, scale: float) -> bool:
    """Add ``scale · ΔW`` of a plain (non-Tucker) LoRA to `weight` in place, one block of rows at a time.

    Same float32 arithmetic as ``LoRA.delta`` followed by the scaled add (``(up @ down) · alpha/rank``, then
    ``· scale``, then ``+ W``). Returns False (nothing done) when the module is not such a LoRA.
    """
    if module.algorithm != "lora" or "mid" in module.tensors or not is_plain(module):
        return False
    w2 = weight.reshape(weight.shape[0], -1)
    down = module.tensors["down"].float32()
    up = module.tensors["up"].float32()
    u = up.reshape(up.shape[0], -1)
    d = down.reshape(down.shape[0], -1)
    if u.shape[0] != w2.shape[0] or d.shape[1] != w2.shape[1] or u.shape[1] != d.shape[0]:
        return False
    f, s = np.float32(module.scale), np.float32(scale)
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, w2.shape[1]))
    for i in range(0, w2.shape[0], step):
        block = u[i : i + step] @ d
        block *= f
        block *= s
        w2[i : i + step] += block
    if not np.shares_memory(w2, weight):  # reshape had to copy (non-contiguous view): write back
        weight[...] = w2.reshape(weight.shape)
    return True


def patch_torch(torch, weight, module: Module, scale: float):
    """Like :func:`patch_numpy` for a float32 torch tensor; plain LoRA runs on the tensor's device."""
    if is_plain(module) and module.algorithm == "lora":
        return weight + lora_delta_torch(torch, module, weight.device, tuple(weight.shape)) * scale
    new = patch_numpy(weight.detach().cpu().numpy(), module, scale)
    return torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32)).to(weight.device)


def bias_delta(module: Module) -> np.ndarray | None:
    """Δbias of a module (scale included): ``lora_B.bias`` for LoRA, ``bias_delta`` of other algorithms."""
    algo = _algorithm(module)
    if module.algorithm == "lora" and "bias" in module.tensors:
        return module.tensors["bias"].float32() * np.float32(module.scale)
    fn = getattr(algo, "bias_delta", None)
    return fn(module) if fn is not None else None


def expected_shape(module: Module) -> tuple[int, ...] | None:
    from lorafmt.algorithms._base import target_shape_of

    return target_shape_of(module)


# ------------------------------------------------------------------------------------------- report


class LoraUse(BaseModel):
    """One LoRA given to :func:`fuse`: where it came from, its strength, and what it touched."""

    source: str | None
    layout: str | None
    scale: float
    modules: int
    matched: int


class FuseReport(BaseModel):
    """What :func:`fuse` did.

    ``modules_fused`` lists canonical module paths (each once, even when several LoRAs touched it);
    ``unmatched`` lists ``"<lora index>:<module path>"`` for LoRA modules with no target in the base;
    ``skipped`` lists modules of components a component-file base does not hold.
    """

    base: str
    output: str
    kind: str
    family: str | None = None
    components: list[str] = Field(default_factory=list)
    device: str
    dtype: str | None = None
    loras: list[LoraUse] = Field(default_factory=list)
    modules_fused: list[str] = Field(default_factory=list)
    tensors_fused: int = 0
    tensors_copied: int = 0
    bytes_copied: int = 0
    bytes_computed: int = 0
    files_linked: int = 0
    unmatched: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)
    checked_finite: bool = True
    seconds: float = 0.0
    notes: list[Diagnostic] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------- planning


@dataclass
class _Patch:
    """One LoRA module's contribution to one base tensor."""

    lora: int
    module: Module
    scale: float
    rows: tuple[int, int] | None = None
    bias: bool = False


@dataclass
class _FilePlan:
    src: Path
    header: Header
    patches: dict[str, list[_Patch]] = field(default_factory=dict)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a trailing ``:number`` is the scale (default 1.0).

    >>> parse_lora_arg("style.safetensors:0.7")
    ('style.safetensors', 0.7)
    >>> parse_lora_arg("C:/loras/x.safetensors")
    ('C:/loras/x.safetensors', 1.0)
    """
    if os.path.exists(text):
        return text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _load_loras(loras: Sequence[Any], family: str | None) -> list[tuple[LoraFile, float]]:
    from lorafmt.api import read

    out = []
    for item in loras:
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                msg = f"each LoRA is (path_or_lora, scale); got {item!r}"
                raise FuseError(msg)
            src, scale = item
        elif isinstance(item, str):
            src, scale = parse_lora_arg(item)  # "PATH[:SCALE]"
        else:
            src, scale = item, 1.0
        lora = src if isinstance(src, LoraFile) else read(src, family=family)
        errors = [d for d in lora.issues if d.severity == "error"]
        if errors:
            first = errors[0]
            msg = f"LoRA has {len(errors)} structural problem(s): {first.message}"
            raise FuseError(msg, file=lora.provenance.source, key=first.key, module=first.module)
        out.append((lora, float(scale)))
    if not out:
        msg = "no LoRA given; pass at least one --lora PATH[:SCALE]"
        raise FuseError(msg)
    return out


_UNET_HINTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.")
_TRANSFORMER_HINTS = (
    "transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "pos_embed.", "context_embedder.",
    "transformer_layers.", "mlm_layer.",  # UVit2DModel (aMUSEd)
)
_CLIP_HINTS = ("text_model.", "encoder.layers.", "embeddings.token_embedding")
_T5_HINTS = ("encoder.block.", "shared.")


def infer_component(keys: Sequence[str], path: Path, loras: list[tuple[LoraFile, float]]) -> str:
    """The component a diffusers component file holds: its folder name, else its keys (+ the LoRAs)."""
    if path.parent.name in COMPONENTS:
        return path.parent.name
    keys = list(keys)
    if any(k.startswith(_UNET_HINTS) for k in keys):
        return "unet"
    if any(k.startswith(_TRANSFORMER_HINTS) for k in keys):
        return "transformer"
    if any(k.startswith(_CLIP_HINTS) for k in keys):
        candidates = ["text_encoder", "text_encoder_2"]
    elif any(k.startswith(_T5_HINTS) for k in keys):
        candidates = ["text_encoder_2", "text_encoder_3"]
    else:
        msg = "cannot tell which component this file holds"
        raise FuseError(msg, file=str(path), hint="pass --component unet|transformer|text_encoder|...")
    touched = {m.component for lora, _ in loras for m in lora.modules.values()} & set(candidates)
    if len(touched) == 1:
        return touched.pop()
    if not touched:
        return candidates[0]
    msg = f"this text-encoder file could be {' or '.join(candidates)} and the LoRAs touch both"
    raise FuseError(msg, file=str(path), hint=f"pass --component {candidates[0]} or {candidates[1]}")


def _component_targets(rel: str, keys: set[str]) -> tuple[str | None, str | None]:
    """(weight key, bias key) of a module path in a diffusers/transformers component state dict."""
    candidates = [rel]
    if rel.startswith("text_model."):
        candidates.append(rel[len("text_model.") :])  # transformers 5 CLIP has no text_model level
    else:
        candidates.append("text_model." + rel)
    for c in candidates:
        if c + ".weight" in keys:
            return c + ".weight", (c + ".bias" if c + ".bias" in keys else None)
    return None, None


def _add_patch(plan: _FilePlan, key: str, patch: _Patch) -> None:
    plan.patches.setdefault(key, []).append(patch)


def _check_shapes(plans: list[_FilePlan]) -> None:
    """Every patch fits its target before a byte is written."""
    for plan in plans:
        for key, patches in plan.patches.items():
            info = plan.header.tensors[key]
            if info.dtype not in _TORCH_FLOATS:
                msg = f"target tensor has dtype {info.dtype}; only F16/BF16/F32/F64 weights can be fused"
                raise FuseError(msg, file=str(plan.src), key=key, module=patches[0].module.path)
            for p in patches:
                if p.bias:
                    delta = bias_delta(p.module)
                    n = None if delta is None else delta.size
                    want = info.shape[0] // p.rows[1] if p.rows else (info.shape[0] if info.shape else 1)
                    if n is not None and n != want:
                        msg = f"LoRA bias has {n} values, the base bias {list(info.shape)} needs {want}"
                        raise FuseError(msg, file=str(plan.src), key=key, module=p.module.path)
                    continue
                shape = expected_shape(p.module)
                tshape = _target_shape(info, p.rows)
                if shape is not None and int(np.prod(shape)) != int(np.prod(tshape)):
                    msg = f"LoRA weight change {list(shape)} does not fit the base weight {list(tshape)}"
                    raise FuseError(msg, file=str(plan.src), key=key, module=p.module.path)


def _target_shape(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, ...]:
    if rows is None:
        return info.shape
    return (info.shape[0] // rows[1], *info.shape[1:])


# ------------------------------------------------------------------------------------------- streaming


class _Fuser:
    """Streams one base safetensors file to an output, patching the planned tensors on `device`."""

    def __init__(self, torch, device, dtype: str | None, unsafe: bool, report: FuseReport) -> None:
        self.torch = torch
        self.device = device
        self.dtype = dtype
        self.unsafe = unsafe
        self.report = report

    def _out_dtype(self, info: TensorInfo) -> str:
        if self.dtype and info.dtype in FLOAT_DTYPES and info.shape != () and info.dtype != self.dtype:
            return self.dtype
        return info.dtype

    def write(self, plan: _FilePlan, dst: str | Path) -> None:
        header = plan.header
        infos = sorted(header.tensors.values(), key=lambda t: t.start)
        sizing = [
            WriteEntry(i.key, self._out_dtype(i), i.shape, src_path=header.path, src_offset=i.start,
                       nbytes=int(np.prod(i.shape, dtype=np.int64)) * _size(self._out_dtype(i)))
            for i in infos
        ]
        head = build_header(sizing, header.metadata)
        with open_output(dst) as fh:
            reserve_space(fh.fileno(), len(head) + sum(e.size for e in sizing))
            fh.write(head)
            write_entries(fh, self._entries(plan, infos))  # atomic_output/atomic_directory flush it if needed

    def _entries(self, plan: _FilePlan, infos: list[TensorInfo]) -> Iterator[WriteEntry]:
        header = plan.header
        for info in infos:
            out_dtype = self._out_dtype(info)
            patches = plan.patches.get(info.key)
            if patches:
                data = self._fused_bytes(header, info, patches, out_dtype)
                self.report.tensors_fused += 1
                self.report.bytes_computed += len(data)
                yield WriteEntry(info.key, out_dtype, info.shape, data=data)
            elif out_dtype == info.dtype:
                self.report.tensors_copied += 1
                self.report.bytes_copied += info.nbytes
                yield WriteEntry(info.key, info.dtype, info.shape, src_path=header.path, src_offset=info.start,
                                 nbytes=info.nbytes)
            else:
                data = from_float32(header.read_float32(info.key), out_dtype).tobytes()
                self.report.bytes_computed += len(data)
                yield WriteEntry(info.key, out_dtype, info.shape, data=data)

    def _fused_bytes(self, header: Header, info: TensorInfo, patches: list[_Patch], out_dtype: str) -> bytes | memoryview:
        raw = _read_owned(header, info)
        if self.torch is None:
            w = to_float32(raw, info.dtype)  # a new array for every float dtype
            del raw
            for p in patches:
                view = w if p.rows is None else w[slice(*_row_bounds(info.shape[0], p.rows))]
                if p.bias:
                    view += np.float32(p.scale) * bias_delta(p.module).reshape(view.shape)
                elif not add_lora_rows(view, p.module, p.scale):
                    view[...] = patch_numpy(view, p.module, p.scale)
            out = from_float32(w, out_dtype)
            del w
            bad = 0 if self.unsafe else _count_nonfinite(out, out_dtype)
            data = memoryview(np.ascontiguousarray(out).reshape(-1).view(np.uint8))
        else:
            torch = self.torch
            w = raw_to_torch(torch, raw, info.dtype).to(device=self.device, dtype=torch.float32)
            del raw
            for p in patches:
                view = w if p.rows is None else w[slice(*_row_bounds(info.shape[0], p.rows))]
                if p.bias:
                    view += torch.from_numpy(bias_delta(p.module).reshape(view.shape)).to(self.device) * p.scale
                else:
                    view.copy_(patch_torch(torch, view, p.module, p.scale))
            out = w.to(_torch_dtype(torch, out_dtype))
            del w
            bad = 0 if self.unsafe else int((~torch.isfinite(out)).sum())
            data = torch_to_bytes(torch, out, out_dtype)
        if bad:
            modules = sorted({p.module.path for p in patches})
            msg = (
                f"fusing produced {bad} non-finite value(s) in {out_dtype} for module {', '.join(modules)}; "
                "nothing was written"
            )
            raise FuseError(msg, file=header.path, key=info.key, module=modules[0],
                            hint="check the LoRA with `lorafmt validate --check-values`; --unsafe writes anyway")
        return data


def _count_nonfinite(encoded: np.ndarray, dtype: str) -> int:
    """Non-finite values in an array encoded as `dtype` (bf16 as uint16: exponent bits all ones)."""
    if dtype == "BF16":
        return int(np.count_nonzero((encoded & 0x7F80) == 0x7F80))
    return int(encoded.size - np.count_nonzero(np.isfinite(encoded)))


def _size(dtype: str) -> int:
    from lorafmt.dtypes import DTYPE_SIZES

    return DTYPE_SIZES[dtype]


def _row_bounds(total: int, rows: tuple[int, int]) -> tuple[int, int]:
    index, parts = rows
    size = total // parts
    return index * size, (index + 1) * size


def _read_owned(header: Header, info: TensorInfo) -> np.ndarray:
    """Read one tensor into a fresh writable array (no extra copy)."""
    buf = bytearray(info.nbytes)
    with open(header.path, "rb", buffering=0) as fh:
        fh.seek(info.start)
        view = memoryview(buf)
        got = 0
        while got < info.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                from lorafmt.errors import TruncatedFileError

                msg = f"file changed or truncated while reading: expected {info.nbytes} bytes, got {got}"
                raise TruncatedFileError(msg, file=header.path, key=info.key)
            got += n
    return np.frombuffer(buf, dtype=numpy_dtype(info.dtype)).reshape(info.shape)


# ------------------------------------------------------------------------------------------- base kinds


def _is_pipeline(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model_index.json").is_file() or any((path / c).is_dir() for c in COMPONENTS)
    )


def _component_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors"))


def _match_component(
    plans: list[_FilePlan], component: str, loras: list[tuple[LoraFile, float]], matched: set[tuple[int, str]]
) -> None:
    for plan in plans:
        keys = set(plan.header.tensors)
        for i, (lora, scale) in enumerate(loras):
            for path, module in lora.modules.items():
                comp, _, rel = path.partition(".")
                if comp != component:
                    continue
                wkey, bkey = _component_targets(rel, keys)
                if wkey is None:
                    continue
                matched.add((i, path))
                _add_patch(plan, wkey, _Patch(i, module, scale))
                if bkey is not None and bias_delta_exists(module):
                    _add_patch(plan, bkey, _Patch(i, module, scale, bias=True))


def bias_delta_exists(module: Module) -> bool:
    """True when the module changes its target's bias too."""
    if module.algorithm == "lora":
        return "bias" in module.tensors
    fn = getattr(_algorithm(module), "bias_delta", None)
    return fn is not None and fn(module) is not None


def _match_checkpoint(plan: _FilePlan, family: str, loras: list[tuple[LoraFile, float]], matched: set[tuple[int, str]]) -> None:
    keys = plan.header.tensors
    for i, (lora, scale) in enumerate(loras):
        for path, module in lora.modules.items():
            target: CheckpointTarget | None = checkpoint_target(path, family)
            if target is None or target.key not in keys:
                continue
            matched.add((i, path))
            _add_patch(plan, target.key, _Patch(i, module, scale, rows=target.rows))
            if target.bias_key in keys and bias_delta_exists(module):
                _add_patch(plan, target.bias_key, _Patch(i, module, scale, rows=target.rows, bias=True))


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link `src` to `dst` when the filesystem allows, else copy; True when linked."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


# ------------------------------------------------------------------------------------------- public


def fuse(
    base: str | os.PathLike,
    loras: Sequence[tuple[str | os.PathLike | LoraFile, float]] | Sequence[Any],
    out: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str | None = None,
    component: str | None = None,
    family: str | None = None,
    unsafe: bool = False,
    allow_unmatched: bool = False,
    force: bool = False,
) -> FuseReport:
    """Fuse LoRAs into a base model and write the result to `out` (a file, or a folder for a pipeline base).

    Args:
        base: a diffusers component ``.safetensors`` file, a diffusers pipeline folder, or an original
            single-file SD1.x/SD2.x/SDXL checkpoint.
        loras: ``[(path_or_LoraFile, scale), ...]`` in any layouts; applied in this order.
        out: output path; refused if it exists unless `force`.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``; the arithmetic is float32 there
            (torch on CUDA; exact float32 numpy on the CPU, where torch is not needed). A ``torch.device``
            selects the torch arithmetic on that device, CPU included.
        dtype: write float tensors in this dtype (``fp16``/``bf16``/``fp32``) instead of the base's (for a
            pipeline: in the files that are fused; the others are linked unchanged).
        component: which component a component file holds, when its folder and keys don't say.
        family: the LoRAs' family when detection cannot tell (the base decides for checkpoints).
        unsafe: skip the finiteness check of fused tensors.
        allow_unmatched: report, rather than refuse, LoRA modules that find no target.
        force: replace an existing output.

    Raises:
        FuseError: no target / shape mismatch / non-finite result (nothing is written).
        MissingExtraError: a CUDA device was asked for and torch is not installed.

    Example:
        >>> r = fuse("model.safetensors", [("a.safetensors", 0.7), ("b.safetensors", -0.3)],
        ...          "fused.safetensors", device="cpu")  # doctest: +SKIP
        >>> r.tensors_fused  # doctest: +SKIP
        212
    """
    started = time.perf_counter()
    torch_device = type(device).__module__ == "torch" and type(device).__name__ == "device"
    dev = str(device) if torch_device else resolve_device(device)
    # Plain "cpu" computes with numpy (exact float32, no torch needed); CUDA, or an explicit torch.device,
    # computes with torch on that device.
    torch = require_torch() if (torch_device or dev != "cpu") else None
    from lorafmt.api import _norm_dtype

    out_dtype = _norm_dtype(dtype)
    base_path = Path(base)
    out_path = Path(out)
    if not base_path.exists():
        msg = "no such file or folder"
        raise SourceError(msg, file=str(base_path))
    if out_path.resolve() == base_path.resolve() and base_path.is_dir():
        msg = "output folder is the base folder; write the fused pipeline elsewhere"
        raise FuseError(msg, file=str(out_path))

    if _is_pipeline(base_path):
        kind: BaseKind = "pipeline"
        base_family = family
    elif base_path.is_dir():
        msg = "folder is not a diffusers pipeline (no model_index.json, no unet/transformer/text_encoder folder)"
        raise SourceError(msg, file=str(base_path))
    else:
        header = _read_base_header(base_path)
        ck_family = checkpoint_family(header.tensors) if any(k.startswith("model.diffusion_model.") for k in header.tensors) else None
        kind = "checkpoint" if ck_family else "component"
        base_family = ck_family or family
    lora_list = _load_loras(loras, base_family if kind == "checkpoint" else family)

    report = FuseReport(base=str(base_path), output=str(out_path), kind=kind, family=base_family, device=str(dev), dtype=out_dtype)
    matched: set[tuple[int, str]] = set()
    in_scope: set[tuple[int, str]] = set()
    fuser = _Fuser(torch, dev, out_dtype, unsafe, report)
    report.checked_finite = not unsafe

    if kind == "checkpoint":
        plan = _FilePlan(base_path, header)
        _match_checkpoint(plan, base_family, lora_list, matched)
        in_scope = {(i, p) for i, (lora, _) in enumerate(lora_list) for p in lora.modules}
        _finish_matching(report, lora_list, matched, in_scope, allow_unmatched)
        _check_shapes([plan])
        with atomic_output(out_path, force=force) as tmp:
            fuser.write(plan, tmp)
        report.components = sorted({p.split(".", 1)[0] for _, p in matched})
    elif kind == "component":
        comp = component or infer_component(header.tensors, base_path, lora_list)
        plan = _FilePlan(base_path, header)
        _match_component([plan], comp, lora_list, matched)
        in_scope = {(i, p) for i, (lora, _) in enumerate(lora_list) for p in lora.modules if p.split(".", 1)[0] == comp}
        report.skipped = sorted(f"{i}:{p}" for i, (lora, _) in enumerate(lora_list) for p in lora.modules if (i, p) not in in_scope)
        if report.skipped:
            report.notes.append(
                Diagnostic(code="F002", severity="info",
                           message=f"{len(report.skipped)} LoRA module(s) belong to other components than {comp} and were not fused")
            )
        _finish_matching(report, lora_list, matched, in_scope, allow_unmatched)
        _check_shapes([plan])
        with atomic_output(out_path, force=force) as tmp:
            fuser.write(plan, tmp)
        report.components = [comp]
    else:
        _fuse_pipeline(base_path, out_path, lora_list, fuser, report, matched, allow_unmatched, force)

    report.modules_fused = sorted({p for _, p in matched})
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _read_base_header(path: Path) -> Header:
    """The base's safetensors header; a pickled base is refused (it cannot be streamed), after the safe
    loader has had its say when pickle loading is allowed (so a malicious file is reported as such)."""
    from lorafmt.errors import PickleFileError

    try:
        return read_header(path)
    except PickleFileError:
        from lorafmt.io.source import _ALLOW_PICKLE, open_source

        if not _ALLOW_PICKLE.get():
            raise
        open_source(path, allow_pickle=True)  # raises on anything torch's weights_only loader refuses
        msg = "a pickled checkpoint cannot be fused by streaming; convert it to safetensors first"
        raise FuseError(msg, file=str(path), hint="e.g. load it with torch.load(weights_only=True) and save_file() it") from None


def _finish_matching(
    report: FuseReport,
    loras: list[tuple[LoraFile, float]],
    matched: set[tuple[int, str]],
    in_scope: set[tuple[int, str]],
    allow_unmatched: bool,
) -> None:
    unmatched = sorted(in_scope - matched)
    report.unmatched = [f"{i}:{p}" for i, p in unmatched]
    unplaced = [(i, k) for i, (lora, _) in enumerate(loras) for k in sorted(lora.unplaced)]
    report.loras = [
        LoraUse(
            source=lora.provenance.source,
            layout=lora.provenance.layout,
            scale=scale,
            modules=len(lora.modules),
            matched=sum(1 for j, _ in matched if j == i),
        )
        for i, (lora, scale) in enumerate(loras)
    ]
    if (unmatched or unplaced) and not allow_unmatched:
        if unmatched:
            i, path = unmatched[0]
            more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
            msg = f"{len(unmatched)} LoRA module(s) found no target in the base: {path}{more}"
            raise FuseError(msg, file=loras[i][0].provenance.source, module=path,
                            hint="is this LoRA for another model family? --allow-unmatched fuses the rest")
        i, key = unplaced[0]
        msg = f"{len(unplaced)} LoRA key(s) could not be placed on a module: {key}"
        raise FuseError(msg, file=loras[i][0].provenance.source, key=key, hint="--allow-unmatched fuses the rest")
    for i, path in unmatched:
        report.notes.append(Diagnostic(code="F001", severity="warning", message="no target in the base; not fused", module=path,
                                       data={"lora": i}))
    for i, key in unplaced:
        report.notes.append(Diagnostic(code="F003", severity="warning", message="unplaced LoRA key; not fused", key=key,
                                       data={"lora": i}))


def _fuse_pipeline(
    base: Path,
    out: Path,
    loras: list[tuple[LoraFile, float]],
    fuser: _Fuser,
    report: FuseReport,
    matched: set[tuple[int, str]],
    allow_unmatched: bool,
    force: bool,
) -> None:
    wanted = {m.component for lora, _ in loras for m in lora.modules.values()}
    plans_by_comp: dict[str, list[_FilePlan]] = {}
    for comp in sorted(wanted):
        folder = base / comp
        if not folder.is_dir():
            continue
        files = _component_files(folder)
        if not files:
            others = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
            msg = f"component {comp} has no .safetensors weights" + (f" (found {', '.join(others)})" if others else "")
            raise FuseError(msg, file=str(folder), hint="convert the component to safetensors first")
        plans = [_FilePlan(f, read_header(f)) for f in files]
        _match_component(plans, comp, loras, matched)
        fused = [p for p in plans if p.patches]
        if fused:
            plans_by_comp[comp] = fused
    in_scope = {(i, p) for i, (lora, _) in enumerate(loras) for p in lora.modules}
    _finish_matching(report, loras, matched, in_scope, allow_unmatched)
    all_plans = [p for plans in plans_by_comp.values() for p in plans]
    _check_shapes(all_plans)
    fused_files = {p.src.resolve(): p for p in all_plans}
    stale: list[str] = []
    with atomic_directory(out, force=force) as tmp:
        for root, dirs, files in os.walk(base):
            rel_root = Path(root).relative_to(base)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            (tmp / rel_root).mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                src = Path(root) / name
                dst = tmp / rel_root / name
                plan = fused_files.get(src.resolve())
                if plan is not None:
                    fuser.write(plan, dst)
                    continue
                comp = rel_root.parts[0] if rel_root.parts else None
                if comp in plans_by_comp and src.suffix in (".bin", ".pt", ".ckpt", ".pth"):
                    stale.append(str(rel_root / name))  # pickled twin of fused weights: would be stale
                    continue
                if _link_or_copy(src, dst):
                    report.files_linked += 1
    report.components = sorted(plans_by_comp)
    for rel in stale:
        report.notes.append(Diagnostic(code="F004", severity="warning",
                                       message="pickled weights of a fused component not copied (they would be stale)", key=rel))


def fuse_summary(report: FuseReport) -> str:
    """One human-readable line for a report (the CLI prints it)."""
    parts = [
        f"fused {len(report.modules_fused)} modules into {report.tensors_fused} tensors ({report.kind}"
        + (f", {report.family}" if report.family else "")
        + f", {', '.join(report.components) or '-'}) on {report.device}",
        f"{report.tensors_copied} tensors copied unchanged",
    ]
    if report.files_linked:
        parts.append(f"{report.files_linked} files linked")
    if report.unmatched:
        parts.append(f"{len(report.unmatched)} LoRA modules unmatched")
    return "; ".join(parts) + f" -> {report.output}"


class _CallableModule(types.ModuleType):
    """``lorafmt.fuse`` is both this module and the function: importing the submodule first (as the CLI does)
    must not turn ``lorafmt.fuse(...)`` into "module is not callable"."""

    def __call__(self, *args, **kwargs) -> FuseReport:
        return fuse(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
