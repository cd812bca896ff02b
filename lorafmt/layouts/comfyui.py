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

Capabilities: LoRA (no Tucker), DoRA (kept verbatim as ``dora_scale``), per-module alpha as a tensor; families
flux1 and sd3.

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
from lorafmt.layouts._common import ModuleParts, assemble, issue
from lorafmt.layouts._transformer import bfl_or_sai, canonicalize, emit, plan_native
from lorafmt.naming.clip import canonical_text_path
from lorafmt.schema import LoraFile, TensorRef

__all__ = ["LAYOUT", "ComfyUILayout"]

_KEY_RE = re.compile(
    r"^(diffusion_model|text_encoders\.(?:clip_l|clip_g|t5xxl)\.transformer)\.(.+?)\."
    r"(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha|dora_scale)$"
)
_PARAM = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight",
    "lora_up.weight": "lora_up.weight",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
}
_TEXT = {
    "flux1": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
}
_PARAMS_OUT = {"down": "lora_A.weight", "up": "lora_B.weight"}


def _raw_module(key: str) -> str:
    m = _KEY_RE.match(key)
    return f"{m.group(1)}.{m.group(2)}" if m else key.rsplit(".", 2)[0]


class ComfyUILayout(Layout):
    name = "comfyui"
    aliases = ("ai-toolkit", "comfy")
    description = "ComfyUI / ai-toolkit Flux.1 & SD3: diffusion_model.<BFL/SAI name>.lora_A/lora_B (+ .alpha), text_encoders.*"
    capabilities = Capabilities(
        algorithms=frozenset({"lora"}),
        dora_axes=frozenset({"in", "out"}),
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
        if not claimed or bfl_or_sai(native) is None:
            return None
        total = len(source.tensors)
        return Match(self.name, round(100 * claimed / total), [f"{claimed}/{total} keys are diffusion_model.<native name>.lora_A/lora_B"])

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        native_paths = [m.group(2) for k in source.tensors if (m := _KEY_RE.match(k)) and m.group(1) == "diffusion_model"]
        tfamily = family if family in _TEXT else bfl_or_sai(native_paths) or "flux1"
        groups: dict[str, ModuleParts] = {}
        unplaced: dict[str, TensorRef] = {}
        issues: list = []
        for key, ref in source.tensors.items():
            m = _KEY_RE.match(key)
            if not m:
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
        lora = assemble(groups, source, layout=self.name, unplaced=unplaced, issues=issues, evidence=[])
        canonicalize(lora, tfamily, detect_block_diagonal=True, raw_module=_raw_module)
        fam, fam_evidence = (family, ["given"]) if family else detect_family(lora)
        lora.family = fam or tfamily
        lora.provenance.evidence = fam_evidence if fam else [*fam_evidence, f"{tfamily} native names"]
        return lora

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        family = options.family or lora.family
        native, notes = plan_native(lora, family, allow_lossy=options.allow_lossy, layout=self.name)
        out = PlannedFile(metadata={k: v for k, v in lora.metadata.items() if k != "lora_adapter_metadata"})
        plan = WritePlan(files={"": out}, notes=notes)
        text = {v: k for k, v in _TEXT[family].items()}
        for path, module in native.items():
            component, rel = path.split(".", 1)
            if component == "transformer":
                name = f"diffusion_model.{rel}"
            elif component in text:
                name = f"text_encoders.{text[component]}.transformer.{rel}"
            else:
                from lorafmt.errors import UnsupportedFeatureError

                msg = f"the comfyui layout has no text encoder slot for {component!r} in {family}"
                raise UnsupportedFeatureError(msg, module=path)
            emit(out, name, module, _PARAMS_OUT)
        return plan


LAYOUT = ComfyUILayout()
