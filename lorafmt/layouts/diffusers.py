"""diffusers layout: what ``save_lora_weights`` writes today.

Produced by: diffusers ``LoraBaseMixin.write_lora_layers`` / ``_save_lora_weights`` (component-prefixed
``get_peft_model_state_dict`` output). Read by diffusers ``load_lora_weights`` / ``load_lora_adapter``,
ComfyUI, InvokeAI.

Key grammar: ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_B.bias`` with
lora_bias, ``.lora_magnitude_vector`` for DoRA), components ``unet``, ``transformer``, ``text_encoder``,
``text_encoder_2``, ``text_encoder_3``. Alpha has no tensor: it travels in the ``lora_adapter_metadata``
header entry, a JSON object of component-prefixed ``LoraConfig`` fields (``unet.r``, ``unet.lora_alpha``,
``unet.alpha_pattern`` …) that diffusers passes to ``LoraConfig``. Without it, scale is 1.

Capabilities: LoRA only (no Tucker), DoRA on the output axis, lora_B bias, per-module alpha via metadata.
Families: sd1, sd2, sdxl, sd3, flux1 and amused (``AmusedLoraLoaderMixin.save_lora_weights`` writes
``transformer.`` / ``text_encoder.`` keys and no ``lora_adapter_metadata``: its files carry scale 1).
"""

from __future__ import annotations

import json
import re

from lorafmt.errors import HeaderError
from lorafmt.families import detect_family
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match, PlannedFile, WriteOptions, WritePlan
from lorafmt.layouts._common import ModuleParts, assemble, carried_metadata, issue
from lorafmt.naming.clip import canonical_text_path
from lorafmt.naming.shapes import linear_factor
from lorafmt.naming.peft_config import config_alpha, config_for_modules
from lorafmt.algorithms.dora import adopt_peft_magnitude, peft_magnitude_shape
from lorafmt.schema import LoraFile, TensorRef

__all__ = ["LAYOUT", "DiffusersLayout", "METADATA_KEY"]

METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_KEY_RE = re.compile(
    r"^(unet|transformer|text_encoder|text_encoder_2|text_encoder_3)\.(.+?)\."
    r"(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?)$"
)
_PARAM_TO_LYCORIS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_B.bias": "lora_B.bias",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
}


class DiffusersLayout(Layout):
    name = "diffusers"
    description = "diffusers save_lora_weights: <component>.<module>.lora_A/lora_B.weight + lora_adapter_metadata"
    capabilities = Capabilities(
        algorithms=frozenset({"lora"}),
        dora_axes=frozenset({"out"}),
        lora_bias=True,
        alpha="metadata",
        families=frozenset({"sd1", "sd2", "sdxl", "sd3", "flux1", "amused"}),
        components=frozenset(COMPONENTS),
    )

    def sniff(self, source: Source) -> Match | None:
        if source.kind == "dir" or not source.tensors:
            return None
        claimed = sum(1 for k in source.tensors if _KEY_RE.match(k))
        if not claimed:
            return None
        evidence = [f"{claimed}/{len(source.tensors)} keys are <component>.<module>.lora_A/lora_B"]
        if METADATA_KEY in source.metadata:
            evidence.append(f"{METADATA_KEY} present")
        return Match(self.name, round(100 * claimed / len(source.tensors)), evidence)

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        configs = _read_configs(source)
        groups: dict[str, ModuleParts] = {}
        unplaced: dict[str, TensorRef] = {}
        for key, ref in source.tensors.items():
            m = _KEY_RE.match(key)
            if not m:
                unplaced[key] = ref
                continue
            component, rel, param = m.groups()
            raw = f"{component}.{rel}"
            if component.startswith("text_encoder"):
                # diffusers on transformers 5 writes CLIP keys without the `text_model.` level
                rel = canonical_text_path(rel)
            path = f"{component}.{rel}"
            parts = groups.setdefault(path, ModuleParts(path, raw))
            parts.add(_PARAM_TO_LYCORIS[param], ref)
        issues: list = []
        lora = assemble(groups, source, layout=self.name, unplaced=unplaced, issues=issues, evidence=[])
        for path, module in lora.modules.items():
            component, rel = path.split(".", 1)
            cfg = configs.get(component)
            if cfg is not None and module.rank:
                try:
                    module.alpha = config_alpha(cfg, rel, module.rank)
                except ValueError as exc:  # a hand-edited or hostile config: the scale is unknown, say so
                    lora.issues.append(issue("R004", str(exc), key=f"__metadata__.{METADATA_KEY}", module=path))
            adopt_peft_magnitude(module)  # lora_magnitude_vector: output axis, canonical (out, 1[, 1, 1]) shape
        fam, fam_evidence = (family, ["given"]) if family else detect_family(lora)
        lora.family = fam
        lora.provenance.evidence = fam_evidence
        return lora

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        family = options.family or lora.family
        metadata = carried_metadata(lora)
        metadata["format"] = "pt"
        out = PlannedFile(metadata=metadata)
        plan = WritePlan(files={"": out})
        per_component: dict[str, dict[str, tuple[int, float]]] = {}
        dora_components: set[str] = set()
        bias_components: set[str] = set()
        for path, module in lora.modules.items():
            component, rel = path.split(".", 1)
            down = linear_factor(module.tensors["down"], path, family)
            up = linear_factor(module.tensors["up"], path, family)
            out.tensors[f"{path}.lora_A.weight"] = down.renamed(f"{path}.lora_A.weight")
            out.tensors[f"{path}.lora_B.weight"] = up.renamed(f"{path}.lora_B.weight")
            if "bias" in module.tensors:
                out.tensors[f"{path}.lora_B.bias"] = module.tensors["bias"].renamed(f"{path}.lora_B.bias")
                bias_components.add(component)
            if module.dora_scale is not None:
                mag = module.dora_scale
                mag = mag.reshape(peft_magnitude_shape(mag.numel, len(up.shape)))
                out.tensors[f"{path}.lora_magnitude_vector"] = mag.renamed(f"{path}.lora_magnitude_vector")
                dora_components.add(component)
            rank = module.rank or 1
            alpha = module.alpha if module.alpha is not None else float(rank)
            per_component.setdefault(component, {})[rel] = (rank, alpha)
        adapter_meta: dict[str, object] = {}
        for component, mods in sorted(per_component.items()):
            cfg = config_for_modules(mods, text_encoder=component.startswith("text_encoder"))
            cfg["use_dora"] = component in dora_components
            cfg["lora_bias"] = component in bias_components
            for k, v in cfg.items():
                adapter_meta[f"{component}.{k}"] = v
        metadata[METADATA_KEY] = json.dumps(adapter_meta, indent=2, sort_keys=True)
        return plan


def _read_configs(source: Source) -> dict[str, dict]:
    raw = source.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = f"{METADATA_KEY} is not valid JSON: {exc}"
        raise HeaderError(msg, file=source.path, key=f"__metadata__.{METADATA_KEY}") from None
    if not isinstance(flat, dict):
        msg = f"{METADATA_KEY} is not a JSON object"
        raise HeaderError(msg, file=source.path, key=f"__metadata__.{METADATA_KEY}")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        for comp in sorted(COMPONENTS, key=len, reverse=True):
            if key.startswith(comp + "."):
                configs.setdefault(comp, {})[key[len(comp) + 1 :]] = value
                break
    return configs


LAYOUT = DiffusersLayout()
