"""OneTrainer's legacy ("mixture") layout for Flux.1 and SD3: kohya-style flattening over *diffusers* module names.

Produced by: OneTrainer ``LoRASaverMixin`` LEGACY output (``convert_to_mixture``): component prefixes
``transformer -> lora_transformer``, ``text_encoder -> lora_te1``, ``text_encoder_{i} -> lora_te{i}``, module path
flattened with ``_``, split q/k/v kept. Read by ComfyUI, InvokeAI (``FLUX_ONETRAINER_TRANSFORMER_KEY_REGEX``),
diffusers (``has_mixture`` branch, which asserts on T5 keys; formats.md §5.3).

Key grammar: ``lora_transformer_<diffusers path with '.'->'_'>.<param>``, ``lora_te1_…`` CLIP-L,
``lora_te2_…`` (Flux: T5-XXL ``encoder_block_…``; SD3: CLIP-G), ``lora_te3_…`` (SD3 T5); params
``lora_down.weight``, ``lora_up.weight``, ``alpha``, ``dora_scale`` (OneTrainer's default DoRA is per input
column, ``[1, in]``). No fused projections: module paths are the canonical ones.

Capabilities: LoRA, DoRA on either axis, per-module alpha as a tensor; families flux1 and sd3.

Example:
    >>> import lorafmt
    >>> lorafmt.read("onetrainer_flux_dora.safetensors").has_dora  # doctest: +SKIP
    True
"""

from __future__ import annotations

import re

from lorafmt.errors import UnsupportedFeatureError
from lorafmt.families import detect_family
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match, PlannedFile, WriteOptions, WritePlan, refuse_unet_family
from lorafmt.layouts._common import ModuleParts, assemble, carried_metadata
from lorafmt.layouts._transformer import emit
from lorafmt.naming.clip import canonical_text_path
from lorafmt.naming.kohya_names import flatten, unflatten
from lorafmt.schema import LoraFile, TensorRef

__all__ = ["LAYOUT", "OneTrainerLayout"]

_KEY_RE = re.compile(r"^(lora_transformer|lora_te[123])_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
_COMPONENT = {"lora_transformer": "transformer", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}
_PREFIX = {v: k for k, v in _COMPONENT.items()}
_PARAMS_OUT = {"down": "lora_down.weight", "up": "lora_up.weight"}


class OneTrainerLayout(Layout):
    name = "onetrainer"
    aliases = ("onetrainer-legacy", "mixture")
    description = "OneTrainer legacy Flux.1/SD3: lora_transformer_<diffusers name>, lora_te1_/lora_te2_ + lora_down/lora_up/alpha/dora_scale"
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
        claimed = transformer = 0
        for key in source.tensors:
            m = _KEY_RE.match(key)
            if m:
                claimed += 1
                transformer += m.group(1) == "lora_transformer"
        if not transformer:
            return None
        total = len(source.tensors)
        return Match(self.name, round(100 * claimed / total), [f"{claimed}/{total} keys are lora_transformer_/lora_teN_<diffusers name>.<param>"])

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        groups: dict[str, ModuleParts] = {}
        unplaced: dict[str, TensorRef] = {}
        for key, ref in source.tensors.items():
            m = _KEY_RE.match(key)
            if not m:
                unplaced[key] = ref
                continue
            prefix, body, param = m.groups()
            component = _COMPONENT[prefix]
            rel = unflatten(body)
            if component != "transformer":
                rel = canonical_text_path(rel)
            path = f"{component}.{rel}"
            groups.setdefault(path, ModuleParts(path, f"{prefix}_{body}")).add(param, ref)
        lora = assemble(groups, source, layout=self.name, unplaced=unplaced, issues=[], evidence=[])
        fam, fam_evidence = (family, ["given"]) if family else detect_family(lora)
        lora.family = fam
        lora.provenance.evidence = fam_evidence
        return lora

    def check_family(self, lora: LoraFile, family: str | None) -> None:
        refuse_unet_family(self, lora, family)
        super().check_family(lora, family)

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        family = options.family or lora.family
        if family is not None and family not in self.capabilities.families and "transformer" in lora.components:
            # another family's transformer (aMUSEd's UVit2DModel) has no OneTrainer spelling any reader un-flattens
            msg = f"the onetrainer layout writes Flux.1/SD3 transformers; family is {family!r}"
            raise UnsupportedFeatureError(msg, hint="write it as diffusers or peft")
        out = PlannedFile(metadata=carried_metadata(lora))
        plan = WritePlan(files={"": out})
        for path, module in lora.modules.items():
            component, rel = path.split(".", 1)
            emit(out, f"{_PREFIX[component]}_{flatten(rel)}", module, _PARAMS_OUT)
        return plan


LAYOUT = OneTrainerLayout()
