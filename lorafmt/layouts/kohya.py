"""kohya sd-scripts / A1111 / ComfyUI layout (alias ``a1111``), including LyCORIS algorithms.

Produced by: kohya-ss/sd-scripts ``networks/lora.py`` (``LoRANetwork``), LyCORIS ``lycoris/kohya.py``,
OneTrainer's KOHYA output. Read by A1111 (``extensions-builtin/Lora``), ComfyUI (``comfy/lora.py``), Forge,
InvokeAI, diffusers (``lora_state_dict`` conversion).

Key grammar: ``<prefix>_<module path with '.' -> '_'>.<param>``; prefixes ``lora_unet`` (U-Net),
``lora_te`` (SD1/SD2 CLIP), ``lora_te1``/``lora_te2`` (SDXL CLIP-L / CLIP-G); params ``lora_down.weight``,
``lora_up.weight``, ``alpha`` (0-d), ``dora_scale``, and the LyCORIS parameter names of each algorithm.
SDXL U-Nets are spelled with SGM block names (``input_blocks_4_1_…``) as sd-scripts writes; diffusers block
names (``down_blocks_1_attentions_0_…``, as OneTrainer's legacy SDXL output writes) are read too.

Capabilities: every algorithm, Tucker, DoRA on either axis, per-module alpha as a tensor, metadata.
"""

from __future__ import annotations

import re

from lorafmt.families import CROSS_ATTENTION_WIDTH, detect_family, family_from_metadata
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match, PlannedFile, WriteOptions, WritePlan
from lorafmt.layouts._common import KNOWN_PARAMS, ModuleParts, alpha_tensor, assemble, issue
from lorafmt.algorithms import get_algorithm
from lorafmt.naming.clip import canonical_text_path
from lorafmt.naming.kohya_names import flatten, unflatten
from lorafmt.naming.shapes import is_linear_projection
from lorafmt.naming.sd_unet import UNET_LAYOUTS, diffusers_to_sgm, is_sgm_path, sgm_to_diffusers
from lorafmt.schema import LoraFile, TensorRef

__all__ = ["LAYOUT", "KohyaLayout"]

_KEY_RE = re.compile(r"^(lora_unet|lora_te[123]?|oft_unet)_([^.]+)\.(.+)$")
_PREFIX_TO_COMPONENT = {
    "lora_unet": "unet",
    "oft_unet": "unet",  # kohya sd-scripts networks.oft (read; written back with lora_unet_, as LyCORIS does)
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
}
# Metadata keys a kohya file does not carry (they belong to other layouts and go stale on conversion).
_FOREIGN_METADATA = frozenset({"lora_adapter_metadata"})


class KohyaLayout(Layout):
    name = "kohya"
    aliases = ("a1111", "sd-scripts", "lycoris")
    description = "kohya sd-scripts / A1111 / ComfyUI: lora_unet_… / lora_te_… + lora_down/lora_up/alpha (LyCORIS too)"
    capabilities = Capabilities(
        algorithms=frozenset({"lora", "loha", "lokr", "full", "norm", "ia3", "oft", "boft"}),
        tucker=True,
        dora_axes=frozenset({"in", "out"}),
        alpha="tensor",
        families=frozenset({"sd1", "sd2", "sdxl"}),
        components=frozenset({"unet", "text_encoder", "text_encoder_2"}),
    )

    # ------------------------------------------------------------------ detection

    def sniff(self, source: Source) -> Match | None:
        if source.kind == "dir" or not source.tensors:
            return None
        known = KNOWN_PARAMS()
        claimed = 0
        prefixes: set[str] = set()
        for key in source.tensors:
            m = _KEY_RE.match(key)
            if m and m.group(3) in known:
                claimed += 1
                prefixes.add(m.group(1))
        if not claimed:
            return None
        total = len(source.tensors)
        evidence = [f"{claimed}/{total} keys are {'/'.join(sorted(prefixes))}_<module>.<kohya param>"]
        if source.metadata.get("ss_network_module"):
            evidence.append(f"ss_network_module={source.metadata['ss_network_module']}")
        return Match(self.name, round(100 * claimed / total), evidence)

    # ------------------------------------------------------------------ reading

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        groups: dict[str, ModuleParts] = {}
        unplaced: dict[str, TensorRef] = {}
        issues: list = []
        sgm_family = family or self._sgm_family(source)
        for key, ref in source.tensors.items():
            m = _KEY_RE.match(key)
            if not m:
                unplaced[key] = ref
                continue
            prefix, body, param = m.groups()
            raw_name = f"{prefix}_{body}"
            parts = groups.get(raw_name)
            if parts is None:
                path = self._canonical_path(prefix, body, sgm_family)
                if path is None:
                    unplaced[key] = ref
                    issues.append(issue("R006", f"cannot place module {raw_name!r}", key=key, severity="warning"))
                    continue
                parts = groups[raw_name] = ModuleParts(path, raw_name)
            parts.add(param, ref)
        lora = assemble(groups, source, layout=self.name, unplaced=unplaced, issues=issues, evidence=[])
        fam, fam_evidence = (family, ["given"]) if family else detect_family(lora)
        lora.family = fam
        lora.provenance.evidence = fam_evidence
        return lora

    @staticmethod
    def _sgm_family(source: Source) -> str:
        """Which U-Net arithmetic to use for SGM names: the cross-attention width decides (SDXL by default)."""
        for key, ref in source.tensors.items():
            if "attn2_to_k" in key and key.endswith("lora_down.weight") and len(ref.shape) >= 2:
                fam = CROSS_ATTENTION_WIDTH.get(ref.shape[1])
                if fam:
                    return fam
        return family_from_metadata(source.metadata) or "sdxl"

    @staticmethod
    def _canonical_path(prefix: str, body: str, sgm_family: str) -> str | None:
        component = _PREFIX_TO_COMPONENT[prefix]
        dotted = unflatten(body)
        if component == "unet":
            if is_sgm_path(dotted):
                mapped = sgm_to_diffusers(dotted, UNET_LAYOUTS.get(sgm_family, UNET_LAYOUTS["sdxl"]))
                if mapped is None:
                    return None
                dotted = mapped
        else:
            dotted = canonical_text_path(dotted)
        return f"{component}.{dotted}"

    # ------------------------------------------------------------------ writing

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        family = options.family or lora.family
        has_te2 = any(m.component == "text_encoder_2" for m in lora.modules.values())
        te1_prefix = "lora_te1" if (family == "sdxl" or has_te2) else "lora_te"
        out = PlannedFile(metadata={k: v for k, v in lora.metadata.items() if k not in _FOREIGN_METADATA})
        plan = WritePlan(files={"": out})
        for path, module in lora.modules.items():
            component, rel = path.split(".", 1)
            if component == "unet":
                prefix = "lora_unet"
                if family == "sdxl":
                    sgm = diffusers_to_sgm(rel, UNET_LAYOUTS["sdxl"])
                    if sgm is not None:
                        rel = sgm
            elif component == "text_encoder":
                prefix = te1_prefix
            elif component == "text_encoder_2":
                prefix = "lora_te2"
            elif component == "text_encoder_3":
                prefix = "lora_te3"
            else:
                from lorafmt.errors import UnsupportedFeatureError

                msg = f"the kohya layout has no prefix for component {component!r} in family {family}"
                raise UnsupportedFeatureError(msg, module=path)
            name = f"{prefix}_{flatten(rel)}"
            algo = get_algorithm(module.algorithm)
            for role, ref in module.tensors.items():
                if module.algorithm == "lora" and role in ("down", "up") and family == "sd2" and is_linear_projection(path, family):
                    # sd-scripts builds SD2 with 1x1-conv projections; its loader expects 4-D factors.
                    if len(ref.shape) == 2:
                        ref = ref.reshape((*ref.shape, 1, 1))
                param = algo.param_names[role]
                out.tensors[f"{name}.{param}"] = ref.renamed(f"{name}.{param}")
            if module.alpha is not None:
                out.tensors[f"{name}.alpha"] = alpha_tensor(module.alpha, module.alpha_dtype, next(iter(module.tensors.values())).dtype).renamed(f"{name}.alpha")
            if module.dora_scale is not None:
                out.tensors[f"{name}.dora_scale"] = module.dora_scale.renamed(f"{name}.dora_scale")
            for extra, ref in module.extras.items():
                out.tensors[f"{name}.{extra}"] = ref.renamed(f"{name}.{extra}")
        return plan


LAYOUT = KohyaLayout()
