"""ComfyUI / ai-toolkit layout for Flux.1 and SD3: ``diffusion_model.`` + the model's native names (BFL for Flux,
SAI MMDiT for SD3) + ``lora_A``/``lora_B`` suffixes.

Produced by: ai-toolkit's Flux/Chroma savers (``diffusion_model.`` + BFL names), OneTrainer's COMFY output, fal/
ComfyUI tools. Read by ComfyUI (``comfy/lora.py`` · ``model_lora_keys_unet``/``model_lora_keys_clip``), InvokeAI,
diffusers (Flux: ``diffusion_model.`` is normalised to ``lora_unet_``).

Key grammar: ``diffusion_model.<native module>.<param>`` with params ``lora_A.weight``/``lora_B.weight`` (also read:
``lora_down.weight``/``lora_up.weight``), ``alpha`` (0-d, optional: absent = scale 1), ``dora_scale``; text
encoders ``text_encoders.clip_l.transformer.<transformers path>``, ``text_encoders.clip_g.transformer.…``,
``text_encoders.t5xxl.transformer.encoder.block…``. Fused projections (``qkv``, ``linear1``) are split into diffusers
modules on read and joined on write exactly (:mod:`lorafmt.naming.fused`).

ComfyUI patch types beyond LoRA (``comfy/lora.py`` · ``calculate_weight``; ``lora_convert.convert_lora_bfl_control``):
``<module>.diff_b`` is a LoRA's output bias (PEFT ``lora_B.bias`` times the module's scale: written only on scale-1
modules, a scale is folded into ``up`` first), ``<norm>.scale.set_weight`` (older ComfyUI: ``<norm>.set_weight``)
replaces a parameter (lorafmt ``mode="set"`` modules), and ``img_in.reshape_weight`` (``[out, in]``) asks for the
base ``img_in`` to be zero-padded to a widened LoRA (written when a Flux ``x_embedder`` LoRA reads other than 64
input features; read back as implied by the shapes). So BFL Control LoRAs convert here exactly.

LyCORIS LoKr/LoHa parameters (``lokr_w1``…, ``hada_w1_a``…) on the same names are read and written as ComfyUI
loads them (LoKr on a fused ``qkv`` splits exactly when the parts fall on whole ``w1`` rows; LoHa on a fused
projection cannot be split and is reported).

Capabilities: LoRA (no Tucker) with bias, LoKr, LoHa, DoRA (kept verbatim as ``dora_scale``), per-module alpha as a tensor,
``set`` tensors; families flux1 and sd3.

Example:
    >>> import lorafmt
    >>> lora = lorafmt.read("flux_aitoolkit.safetensors")  # doctest: +SKIP
    >>> lorafmt.write(lora, "flux_comfy.safetensors", layout="comfyui")  # doctest: +SKIP
"""

from __future__ import annotations

import re

from lorafmt.families import detect_family
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match, PlannedFile, WriteOptions, WritePlan
from lorafmt.layouts._common import ModuleParts, assemble, carried_metadata, issue
from lorafmt.algorithms import BUILTIN_ALGORITHMS, get_algorithm
from lorafmt.errors import UnsupportedFeatureError
from lorafmt.layouts._transformer import bfl_or_sai, canonicalize, emit, fold_scale, plan_native
from lorafmt.naming.flux import FLUX_NAMES
from lorafmt.naming.clip import canonical_text_path
from lorafmt.schema import LoraFile, Module, TensorRef

__all__ = ["LAYOUT", "ComfyUILayout"]

_KEY_RE = re.compile(
    r"^(diffusion_model|text_encoders\.(?:clip_l|clip_g|t5xxl)\.transformer)\.(.+?)\."
    r"(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha|dora_scale|diff_b"
    r"|lokr_w[12](?:_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12]|diff)$"
)
_SET_RE = re.compile(r"^diffusion_model\.(.+?_norm)(?:\.scale)?\.set_weight$")
_RESHAPE_KEY = "diffusion_model.img_in.reshape_weight"
_FLUX_IMG_IN = 64
_PARAM = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight",
    "lora_up.weight": "lora_up.weight",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "diff_b": "lora_B.bias",
    **{p: p for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
    **{p: p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    "diff": "diff",
}
_TEXT = {
    "flux1": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
}
_PARAMS_OUT = {"down": "lora_A.weight", "up": "lora_B.weight", "bias": "lora_B.bias"}


def _raw_module(key: str) -> str:
    m = _KEY_RE.match(key)
    return f"{m.group(1)}.{m.group(2)}" if m else key.rsplit(".", 2)[0]


class ComfyUILayout(Layout):
    name = "comfyui"
    aliases = ("ai-toolkit", "comfy")
    description = "ComfyUI / ai-toolkit Flux.1 & SD3: diffusion_model.<BFL/SAI name>.lora_A/lora_B (+ .alpha), text_encoders.*"
    capabilities = Capabilities(
        algorithms=frozenset({"lora", "lokr", "loha", "full"}),
        dora_axes=frozenset({"in", "out"}),
        lora_bias=True,
        set_tensors=True,
        alpha="tensor",
        families=frozenset({"flux1", "sd3"}),
        components=frozenset({"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}),
    )

    def sniff(self, source: Source) -> Match | None:
        if source.kind == "dir" or not source.tensors:
            return None
        native = []
        claimed = 0
        for key in source.tensors:
            m = _KEY_RE.match(key)
            if m:
                claimed += 1
                if m.group(1) == "diffusion_model":
                    native.append(m.group(2))
            elif _SET_RE.match(key) or key == _RESHAPE_KEY:
                claimed += 1
        if not claimed or (native and bfl_or_sai(native) is None):
            return None
        total = len(source.tensors)
        return Match(self.name, round(100 * claimed / total), [f"{claimed}/{total} keys are diffusion_model.<native name>.lora_A/lora_B"])

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        native_paths = [m.group(2) for k in source.tensors if (m := _KEY_RE.match(k)) and m.group(1) == "diffusion_model"]
        clip_g = any(k.startswith("text_encoders.clip_g.") for k in source.tensors)
        tfamily = family if family in _TEXT else bfl_or_sai(native_paths) or ("sd3" if clip_g else "flux1")
        groups: dict[str, ModuleParts] = {}
        unplaced: dict[str, TensorRef] = {}
        issues: list = []
        sets: dict[str, TensorRef] = {}
        for key, ref in source.tensors.items():
            m = _KEY_RE.match(key)
            if not m:
                s = _SET_RE.match(key)
                target = FLUX_NAMES.native(s.group(1)) if s and tfamily == "flux1" else None
                if target is not None:
                    sets[f"transformer.{target.canonical[0]}"] = ref
                elif key == _RESHAPE_KEY:
                    issues.append(issue("I001", "img_in.reshape_weight is implied by the x_embedder LoRA's shapes", key=key, severity="info"))
                else:
                    unplaced[key] = ref
                continue
            root, rel, param = m.groups()
            if root == "diffusion_model":
                path = f"transformer.{rel}"
            else:
                encoder = root.split(".")[1]
                component = _TEXT[tfamily].get(encoder)
                if component is None:
                    unplaced[key] = ref
                    issues.append(issue("R006", f"no {encoder} text encoder in {tfamily}", key=key, severity="warning"))
                    continue
                path = f"{component}.{canonical_text_path(rel)}"
            groups.setdefault(path, ModuleParts(path, f"{root}.{rel}")).add(_PARAM[param], ref)
        for parts in groups.values():  # `diff_b` is a full diff's bias when the module has a `diff`
            if "diff" in parts.params and "lora_B.bias" in parts.params:
                parts.params["diff_b"] = parts.params.pop("lora_B.bias")
        lora = assemble(groups, source, layout=self.name, unplaced=unplaced, issues=issues, evidence=[])
        canonicalize(lora, tfamily, detect_block_diagonal=True, raw_module=_raw_module)
        for path, ref in sets.items():
            if "full" not in BUILTIN_ALGORITHMS:
                lora.unplaced[ref.key] = ref
                lora.issues.append(issue("R008", "a set_weight tensor needs the `full` algorithm, not available", key=ref.key, module=path, severity="warning"))
                continue
            lora.modules[path] = Module(
                path=path, algorithm="full", tensors={"diff": ref}, alpha=None, alpha_dtype=None,
                dora_scale=None, dora_axis=None, extras={}, mode="set",
            )
        lora.modules = dict(sorted(lora.modules.items()))
        fam, fam_evidence = (family, ["given"]) if family else detect_family(lora)
        lora.family = fam or tfamily
        lora.provenance.evidence = fam_evidence if fam else [*fam_evidence, f"{tfamily} native names"]
        return lora

    def check_family(self, lora: LoraFile, family: str | None) -> None:
        """Refuse U-Net (SD1/SD2/SDXL) and aMUSEd LoRAs up front: this spelling is Flux.1/SD3 only."""
        file = lora.provenance.source if lora.provenance else None
        if family in ("sd1", "sd2", "sdxl") or "unet" in lora.components:
            msg = f"the comfyui layout writes Flux.1/SD3 LoRAs, not U-Net (SD1/SD2/SDXL) ones; family is {family!r}"
            # ComfyUI's own loader reads SD-family LoRAs in the kohya spelling (comfy/lora.py, lora_unet_*)
            raise UnsupportedFeatureError(msg, file=file, hint="ComfyUI loads SD1/SD2/SDXL LoRAs as kohya: use --to kohya")
        super().check_family(lora, family)  # any other family outside Flux.1/SD3 (aMUSEd)

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        family = options.family or lora.family
        native, notes = plan_native(lora, family, allow_lossy=options.allow_lossy, layout=self.name)
        out = PlannedFile(metadata=carried_metadata(lora))
        plan = WritePlan(files={"": out}, notes=notes)
        text = {v: k for k, v in _TEXT[family].items()}
        for path, module in native.items():
            component, rel = path.split(".", 1)
            if module.mode == "set":
                if component != "transformer" or module.algorithm != "full" or not rel.endswith("_norm"):
                    raise UnsupportedFeatureError(f"only QK-norm scales can be set in comfyui, not {path}", module=path)
                key = f"diffusion_model.{rel}.scale.set_weight"
                out.tensors[key] = module.tensors["diff"].renamed(key)
                continue
            if module.algorithm not in ("lora", "lokr", "loha", "full"):
                raise UnsupportedFeatureError(f"algorithm {module.algorithm!r} is not expressible in comfyui", module=path)
            if "bias" in module.tensors and module.scale != 1.0:
                module, note = fold_scale(module)  # diff_b is added as is: scale 1 keeps bias and up consistent
                if note:
                    plan.notes.append(note)
            if component == "transformer":
                name = f"diffusion_model.{rel}"
                if family == "flux1" and rel == "img_in" and module.tensors["down"].shape[1] != _FLUX_IMG_IN:
                    up, down = module.tensors["up"], module.tensors["down"]
                    import numpy as np

                    shape = TensorRef.from_raw(_RESHAPE_KEY, "I64", np.asarray([up.shape[0], down.shape[1]], dtype="<i8"))
                    out.tensors[_RESHAPE_KEY] = shape
            elif component in text:
                name = f"text_encoders.{text[component]}.transformer.{rel}"
            else:
                msg = f"the comfyui layout has no text encoder slot for {component!r} in {family}"
                raise UnsupportedFeatureError(msg, module=path)
            params = _PARAMS_OUT if module.algorithm == "lora" else get_algorithm(module.algorithm).param_names
            emit(out, name, module, params)
            if "bias" in module.tensors:
                bias = out.tensors.pop(f"{name}.lora_B.bias")
                out.tensors[f"{name}.diff_b"] = bias.renamed(f"{name}.diff_b")
        return plan


LAYOUT = ComfyUILayout()
