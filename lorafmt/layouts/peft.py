"""PEFT layout: a folder with one sub-folder per component, each ``adapter_model.safetensors`` +
``adapter_config.json``, loadable by ``PeftModel.from_pretrained(component_model, folder/component)``.

Produced by: peft ``PeftModel.save_pretrained`` (``get_peft_model_state_dict`` strips the adapter name;
``save_and_load.py``). Also read: a bare ``base_model.model.…`` safetensors file (no config: scale 1), and
named-adapter keys (``.lora_A.default.weight``).

Key grammar: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_B.bias``,
``.lora_magnitude_vector`` for DoRA). Alpha lives in the config: ``lora_alpha``/``r`` with ``alpha_pattern`` /
``rank_pattern`` overrides and ``use_rslora``. CLIP keys are written as transformers 5 names them (no
``text_model.`` level); both spellings are read.

Capabilities: LoRA, DoRA (output axis), lora_B bias, per-module alpha via config patterns.
"""

from __future__ import annotations

import json
import re

from lorafmt.errors import SourceError
from lorafmt.families import detect_family
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match, PlannedFile, WriteOptions, WritePlan
from lorafmt.layouts._common import ModuleParts, assemble, issue
from lorafmt.naming.clip import canonical_text_path
from lorafmt.naming.shapes import linear_factor
from lorafmt.naming.peft_config import config_alpha, config_for_modules
from lorafmt.schema import LoraFile, TensorRef

__all__ = ["LAYOUT", "PeftLayout"]

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_KEY_RE = re.compile(
    r"^base_model\.model\.(.+?)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.([A-Za-z0-9_\-]+))??(?:\.(weight|bias))?$"
)
_PARAM = {
    ("lora_A", "weight"): "lora_down.weight",
    ("lora_B", "weight"): "lora_up.weight",
    ("lora_B", "bias"): "lora_B.bias",
    ("lora_magnitude_vector", None): "dora_scale",
    ("lora_magnitude_vector", "weight"): "dora_scale",
}
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "add_embedding.", "conv_norm_out")
_TRANSFORMER_ROOTS = (
    "transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder", "proj_out", "norm_out",
    "time_text_embed.", "pos_embed",
)


def _parse_key(key: str) -> tuple[str, str] | None:
    m = _KEY_RE.match(key)
    if not m:
        return None
    rel, kind, _adapter, suffix = m.groups()
    param = _PARAM.get((kind, suffix))
    if param is None:
        return None
    return rel, param


def infer_component(rel: str) -> str | None:
    if rel.startswith(_UNET_ROOTS):
        return "unet"
    if rel.startswith(_TRANSFORMER_ROOTS):
        return "transformer"
    if rel.startswith(("text_model.", "encoder.layers.")):
        return "text_encoder"
    if rel.startswith("encoder.block."):
        return "text_encoder_3"
    return None


class PeftLayout(Layout):
    name = "peft"
    description = "PEFT adapters: folder/<component>/adapter_model.safetensors + adapter_config.json (also bare base_model.model. files)"
    capabilities = Capabilities(
        algorithms=frozenset({"lora"}),
        dora_axes=frozenset({"out"}),
        lora_bias=True,
        alpha="config",
        families=frozenset({"sd1", "sd2", "sdxl", "sd3", "flux1"}),
        components=frozenset(COMPONENTS),
        directory=True,
    )

    def sniff(self, source: Source) -> Match | None:
        if source.kind == "dir":
            configs = [rel for rel in source.sidecars if rel.endswith("adapter_config.json")]
            weights = [rel for rel in source.parts if rel.endswith("adapter_model.safetensors")]
            if not weights:
                return None
            keys = [k for rel in weights for k in source.parts[rel].tensors]
            claimed = sum(1 for k in keys if _parse_key(k))
            score = round(100 * claimed / max(1, len(keys)))
            return Match(self.name, score, [f"{len(weights)} adapter_model.safetensors, {len(configs)} adapter_config.json", f"{claimed}/{len(keys)} keys base_model.model.…"])
        if not source.tensors:
            return None
        claimed = sum(1 for k in source.tensors if _parse_key(k))
        if not claimed:
            return None
        return Match(self.name, round(100 * claimed / len(source.tensors)), [f"{claimed}/{len(source.tensors)} keys are base_model.model.<module>.lora_A/lora_B"])

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        groups: dict[str, ModuleParts] = {}
        unplaced: dict[str, TensorRef] = {}
        configs: dict[str, dict] = {}
        if source.kind == "dir":
            merged = Source(path=source.path, kind="dict")
            for rel, part in source.parts.items():
                folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
                component = folder.split("/")[-1] if folder.split("/")[-1] in COMPONENTS else None
                cfg_rel = f"{folder}/adapter_config.json" if folder else "adapter_config.json"
                cfg = source.sidecar_json(cfg_rel) if cfg_rel in source.sidecars else {}
                if not isinstance(cfg, dict):
                    msg = "adapter_config.json is not a JSON object"
                    raise SourceError(msg, file=f"{source.path}/{cfg_rel}")
                self._collect(part, component, cfg, groups, unplaced, configs)
                merged.metadata.update(part.metadata)
            source_for_meta = merged
        else:
            self._collect(source, None, {}, groups, unplaced, configs)
            source_for_meta = source
        lora = assemble(groups, source_for_meta, layout=self.name, unplaced=unplaced, issues=[], evidence=[])
        lora.provenance.source = source.path
        lora.metadata = {k: v for k, v in lora.metadata.items() if k != "format"}
        for path, module in lora.modules.items():
            component, rel = path.split(".", 1)
            cfg = configs.get(component)
            if cfg and module.rank:
                try:
                    module.alpha = config_alpha(cfg, rel, module.rank)
                except ValueError as exc:  # a hand-edited or hostile config: the scale is unknown, say so
                    lora.issues.append(issue("R004", str(exc), key="adapter_config.json", module=path))
        fam, fam_evidence = (family, ["given"]) if family else detect_family(lora)
        lora.family = fam
        lora.provenance.evidence = fam_evidence
        return lora

    @staticmethod
    def _collect(part: Source, component: str | None, cfg: dict, groups, unplaced, configs) -> None:
        for key, ref in part.tensors.items():
            parsed = _parse_key(key)
            comp = component
            if parsed is not None and comp is None:
                comp = infer_component(parsed[0])
            if parsed is None or comp is None:
                unplaced[key] = ref
                continue
            rel, param = parsed
            if comp.startswith("text_encoder"):
                rel = canonical_text_path(rel)
            path = f"{comp}.{rel}"
            groups.setdefault(path, ModuleParts(path, key.split(".lora_")[0])).add(param, ref)
            if cfg:
                configs.setdefault(comp, cfg)

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        family = options.family or lora.family
        plan = WritePlan(directory=True)
        # PEFT itself only writes format=pt; the source's metadata rides along in each header (PEFT ignores it).
        metadata = {k: v for k, v in lora.metadata.items() if k != "lora_adapter_metadata"}
        metadata["format"] = "pt"
        per_component: dict[str, dict[str, tuple[int, float]]] = {}
        flags: dict[str, dict[str, bool]] = {}
        for path, module in lora.modules.items():
            component, rel = path.split(".", 1)
            key_rel = rel[len("text_model.") :] if component.startswith("text_encoder") and rel.startswith("text_model.") else rel
            out = plan.files.setdefault(f"{component}/adapter_model.safetensors", PlannedFile(metadata=metadata))
            base = f"base_model.model.{key_rel}"
            out.tensors[f"{base}.lora_A.weight"] = linear_factor(module.tensors["down"], path, family).renamed(f"{base}.lora_A.weight")
            out.tensors[f"{base}.lora_B.weight"] = linear_factor(module.tensors["up"], path, family).renamed(f"{base}.lora_B.weight")
            f = flags.setdefault(component, {"use_dora": False, "lora_bias": False})
            if "bias" in module.tensors:
                out.tensors[f"{base}.lora_B.bias"] = module.tensors["bias"].renamed(f"{base}.lora_B.bias")
                f["lora_bias"] = True
            if module.dora_scale is not None:
                mag = module.dora_scale
                if len(mag.shape) == 2:
                    mag = mag.reshape((mag.numel,))
                out.tensors[f"{base}.lora_magnitude_vector"] = mag.renamed(f"{base}.lora_magnitude_vector")
                f["use_dora"] = True
            rank = module.rank or 1
            per_component.setdefault(component, {})[rel] = (rank, module.alpha if module.alpha is not None else float(rank))
        for component, mods in sorted(per_component.items()):
            cfg = {
                "peft_type": "LORA",
                "base_model_name_or_path": None,
                "bias": "none",
                "fan_in_fan_out": False,
                "inference_mode": True,
                "init_lora_weights": True,
                "lora_dropout": 0.0,
                "modules_to_save": None,
                "task_type": None,
                "use_rslora": False,
                **config_for_modules(mods, text_encoder=component.startswith("text_encoder")),
                **flags[component],
            }
            plan.sidecars[f"{component}/adapter_config.json"] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
        return plan


LAYOUT = PeftLayout()
