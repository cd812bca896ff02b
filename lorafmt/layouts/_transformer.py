"""Helpers the transformer-family layouts share (comfyui, bfl-control, xlabs, onetrainer; kohya for Flux/SD3):
finishing a read of native names into canonical modules, and planning native modules for a write.

Not a layout: layouts import this, never each other.
"""

from __future__ import annotations

from collections.abc import Callable

from lorafmt.errors import LossyConversionError, UnsupportedFeatureError
from lorafmt.layouts._common import alpha_tensor, issue
from lorafmt.layouts._base import PlannedFile
from lorafmt.naming.fused import FusedError, alpha_dtype_for, scaled, canonical_to_native, keep_failed, names_for, native_to_canonical
from lorafmt.schema import Diagnostic, LoraFile, Module

__all__ = ["canonicalize", "plan_native", "emit", "fold_scale", "bfl_or_sai"]


_FLUX_ONLY = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.")
_SD3_ONLY = ("joint_blocks.", "x_embedder.", "t_embedder.", "y_embedder.", "context_embedder")


def bfl_or_sai(paths) -> str | None:
    """``flux1`` when native paths use BFL names, ``sd3`` for SAI MMDiT names, else None (``final_layer.`` is
    shared by both and decides nothing unless alone: then Flux, by far the common case)."""
    fams = set()
    shared = False
    for p in paths:
        if p.startswith(_FLUX_ONLY):
            fams.add("flux1")
        elif p.startswith(_SD3_ONLY):
            fams.add("sd3")
        elif p.startswith("final_layer."):
            shared = True
    if len(fams) == 1:
        return fams.pop()
    if not fams and shared:
        return "flux1"
    return None


def canonicalize(
    lora: LoraFile,
    family: str,
    *,
    detect_block_diagonal: bool = False,
    raw_module: Callable[[str], str] = lambda key: key.split(".", 1)[0],
) -> LoraFile:
    """Map ``transformer.<native>`` modules of `lora` to canonical diffusers paths in place (fused ones split)."""
    names = names_for(family)
    modules, failed = native_to_canonical(lora.modules, names, detect_block_diagonal=detect_block_diagonal)
    lora.modules = dict(sorted(modules.items()))
    keep_failed(failed, lora.unplaced, lora.issues, raw_module)
    return lora


def plan_native(lora: LoraFile, family: str | None, *, allow_lossy: bool, layout: str) -> tuple[dict[str, Module], list[Diagnostic]]:
    """Canonical modules -> ``transformer.<native>`` modules (fused parts joined); refuses or reports what cannot."""
    names = names_for(family)
    if names is None:
        msg = f"the {layout} layout writes Flux.1/SD3 transformers; family is {family!r}"
        # only an unknown family can be fixed with --family; aMUSEd's UVit2DModel has no native spelling here
        hint = "pass --family flux1 or --family sd3" if family is None else "write it as diffusers or peft"
        raise UnsupportedFeatureError(msg, hint=hint)
    native, notes, failed = canonical_to_native(lora.modules, names)
    if failed:
        if not allow_lossy:
            first = sorted(failed)[0]
            paths, why = failed[first]
            msg = f"{len(failed)} module group(s) cannot be written as {layout}: {first}: {why}"
            raise LossyConversionError(msg, module=paths[0], hint="pass --allow-lossy to drop them (each is reported)")
        for _native, (paths, why) in sorted(failed.items()):
            for p in paths:
                notes.append(issue("W001", f"dropped: {why}", module=p, severity="warning"))
    return native, notes


def emit(out: PlannedFile, name: str, module: Module, params: dict[str, str], *, alpha: bool = True, dora: str | None = "dora_scale") -> None:
    """Write `module`'s tensors under ``<name>.<param>`` (role -> param in `params`), its alpha and DoRA scale."""
    for role, ref in module.tensors.items():
        if role not in params:
            msg = f"role {role!r} of {module.path} has no key in this layout"
            raise UnsupportedFeatureError(msg, module=module.path)
        key = f"{name}.{params[role]}"
        out.tensors[key] = ref.renamed(key)
    if alpha and module.alpha is not None:
        dtype = alpha_dtype_for(module.alpha, module.alpha_dtype)
        out.tensors[f"{name}.alpha"] = alpha_tensor(module.alpha, dtype).renamed(f"{name}.alpha")
    if module.dora_scale is not None:
        if dora is None:
            msg = f"{module.path}: this layout cannot hold a DoRA magnitude"
            raise UnsupportedFeatureError(msg, module=module.path)
        out.tensors[f"{name}.{dora}"] = module.dora_scale.renamed(f"{name}.{dora}")
    for extra, ref in module.extras.items():
        out.tensors[f"{name}.{extra}"] = ref.renamed(f"{name}.{extra}")


def fold_scale(module: Module) -> tuple[Module, Diagnostic | None]:
    """The module with its scale (alpha/rank) folded into ``up`` (and ``bias``), alpha dropped: for layouts with
    no alpha. Exact when the scale is a power of two; otherwise ``up`` is written in F32 so the fold does not round."""
    scale = module.scale
    if module.alpha is None or scale == 1.0:
        return module.model_copy(update={"alpha": None, "alpha_dtype": None}), None
    if module.algorithm != "lora":
        raise FusedError(f"{module.path}: cannot fold a scale into algorithm {module.algorithm!r}")
    import math

    pow2 = math.frexp(scale)[0] == 0.5
    tensors = dict(module.tensors)
    for role in ("up", "bias"):
        if role in tensors:
            ref = tensors[role]
            dtype = ref.dtype if pow2 or ref.dtype not in ("F16", "BF16") else "F32"
            tensors[role] = scaled(ref, scale, dtype, f"{module.path}.{role}")
    note = Diagnostic(
        code="C005",
        severity="info",
        message=f"scale {scale:g} (alpha {module.alpha:g} / rank {module.rank}) folded into up" + ("" if pow2 else " (stored as F32, exact)"),
        module=module.path,
    )
    return module.model_copy(update={"tensors": tensors, "alpha": None, "alpha_dtype": None}), note
