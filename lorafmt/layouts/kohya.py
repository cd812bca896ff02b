"""kohya sd-scripts / A1111 / ComfyUI layout (alias ``a1111``), including LyCORIS algorithms.

Produced by: kohya-ss/sd-scripts ``networks/lora.py`` (``LoRANetwork``), LyCORIS ``lycoris/kohya.py``,
OneTrainer's KOHYA output. Read by A1111 (``extensions-builtin/Lora``), ComfyUI (``comfy/lora.py``), Forge,
InvokeAI, diffusers (``lora_state_dict`` conversion).

Key grammar: ``<prefix>_<module path with '.' -> '_'>.<param>``; prefixes ``lora_unet`` (U-Net),
``lora_te`` (SD1/SD2 CLIP), ``lora_te1``/``lora_te2`` (SDXL CLIP-L / CLIP-G); params ``lora_down.weight``,
``lora_up.weight``, ``alpha`` (0-d), ``dora_scale``, and the LyCORIS parameter names of each algorithm.
SDXL U-Nets are spelled with SGM block names (``input_blocks_4_1_…``) as sd-scripts writes; diffusers block
names (``down_blocks_1_attentions_0_…``, as OneTrainer's legacy SDXL output writes) are read too.

Transformer families (sd-scripts ``networks.lora_flux`` / ``networks.lora_sd3``): ``lora_unet_`` + the model's
native names, flattened — BFL for Flux.1 (``double_blocks_0_img_attn_qkv``, ``single_blocks_0_linear1``, …) and
SAI MMDiT for SD3 (``joint_blocks_0_x_block_attn_qkv``, SD3.5 ``x_block_attn2_…``); the body decides the family.
Fused projections are split into diffusers modules on read and joined on write, exactly
(:mod:`lorafmt.naming.fused`), including sd-scripts' ``split_qkv`` block-diagonal saves and their alpha quirk.
Text encoders: Flux ``lora_te1`` CLIP-L -> ``text_encoder``, ``lora_te3`` T5 -> ``text_encoder_2`` (``lora_te2``
with a T5 body, as OneTrainer/InvokeAI spell it, too); SD3 ``lora_te1``/``lora_te2``/``lora_te3`` -> CLIP-L,
CLIP-G, T5 (``text_encoder``/``_2``/``_3``).

Capabilities: every algorithm, Tucker, DoRA on either axis, per-module alpha as a tensor, metadata.
"""

from __future__ import annotations

import json
import re

from lorafmt.families import CROSS_ATTENTION_WIDTH, detect_family, family_from_metadata
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match, PlannedFile, WriteOptions, WritePlan
from lorafmt.layouts._common import KNOWN_PARAMS, ModuleParts, alpha_tensor, assemble, carried_metadata, issue
from lorafmt.algorithms import get_algorithm
from lorafmt.naming.clip import canonical_text_path
from lorafmt.naming.fused import alpha_dtype_for, canonical_to_native, keep_failed, names_for, native_to_canonical
from lorafmt.naming.kohya_names import flatten, unflatten
from lorafmt.naming.shapes import is_linear_projection
from lorafmt.naming.sd_unet import UNET_LAYOUTS, diffusers_to_sgm, is_sgm_path, sgm_to_diffusers
from lorafmt.schema import LoraFile, TensorRef

__all__ = ["LAYOUT", "KohyaLayout"]

_KEY_RE = re.compile(r"^(lora_unet|lora_te[123]?|oft_unet)_([^.]+)\.(.+)$")
_KEY_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "oft_unet_")


def _split_keys(source: Source) -> dict[str, tuple[str, str, str] | None]:
    """split_key of every key of `source`, computed once: detection and reading both walk them."""
    split = getattr(source, "_kohya_split", None)
    if split is None:
        split = {key: split_key(key) for key in source.tensors}
        source._kohya_split = split  # a cache beside the source's fields, not one of them
    return split


def split_key(key: str) -> tuple[str, str, str] | None:
    """(prefix, flattened module body, parameter) of a kohya key, as ``_KEY_RE`` parses it; None otherwise.

    String methods instead of the regex: it runs once per tensor of every file read (a test checks both agree).
    """
    if "\n" in key:  # the regex's `$` also matches before a final newline: leave such keys to it
        m = _KEY_RE.match(key)
        return m.groups() if m else None
    raw, dot, param = key.partition(".")
    if not param:
        return None
    for prefix in _KEY_PREFIXES:
        if raw.startswith(prefix):
            body = raw[len(prefix) :]
            return (prefix[:-1], body, param) if body else None
    return None
_PREFIX_TO_COMPONENT = {
    "lora_unet": "unet",
    "oft_unet": "unet",  # kohya sd-scripts networks.oft (read; written back with lora_unet_, as LyCORIS does)
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
}
# Flattened body starts that identify a transformer family's native names behind ``lora_unet_``.
_TRANSFORMER_BODIES = {
    "flux1": ("double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in_", "vector_in_", "guidance_in_"),
    "sd3": ("joint_blocks_", "x_embedder_", "t_embedder_", "y_embedder_", "context_embedder"),
}
# kohya prefix -> diffusers component, per transformer family (T5 is text_encoder_2 in Flux, text_encoder_3 in SD3).
_TRANSFORMER_TEXT = {
    "flux1": {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_2"},
    "sd3": {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"},
}
_TRANSFORMER_TEXT_OUT = {
    "flux1": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
    "sd3": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"},
}


class KohyaLayout(Layout):
    name = "kohya"
    aliases = ("a1111", "sd-scripts", "lycoris")
    description = "kohya sd-scripts / A1111 / ComfyUI: lora_unet_… / lora_te_… + lora_down/lora_up/alpha (LyCORIS too)"
    capabilities = Capabilities(
        algorithms=frozenset({"lora", "loha", "lokr", "full", "norm", "ia3", "oft", "boft"}),
        tucker=True,
        dora_axes=frozenset({"in", "out"}),
        alpha="tensor",
        families=frozenset({"sd1", "sd2", "sdxl", "sd3", "flux1"}),
        components=frozenset({"unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}),
    )

    # ------------------------------------------------------------------ detection

    def sniff(self, source: Source) -> Match | None:
        if source.kind == "dir" or not source.tensors:
            return None
        known = KNOWN_PARAMS()
        claimed = 0
        prefixes: set[str] = set()
        for parts in _split_keys(source).values():
            if parts and parts[2] in known:
                claimed += 1
                prefixes.add(parts[0])
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
        tfamily = self._transformer_family(source, family)
        sgm_family = family or self._sgm_family(source)
        split = _split_keys(source)
        for key, ref in source.tensors.items():
            parts = split[key]
            if parts is None:
                unplaced[key] = ref
                continue
            prefix, body, param = parts
            raw_name = key[: len(prefix) + 1 + len(body)]
            group = groups.get(raw_name)
            if group is None:
                path = self._transformer_path(prefix, body, tfamily) if tfamily else self._canonical_path(prefix, body, sgm_family)
                if path is None:
                    unplaced[key] = ref
                    issues.append(issue("R006", f"cannot place module {raw_name!r}", key=key, severity="warning"))
                    continue
                group = groups[raw_name] = ModuleParts(path, raw_name)
            group.params[param] = ref
        lora = assemble(groups, source, layout=self.name, unplaced=unplaced, issues=issues, evidence=[])
        if tfamily:
            names = names_for(tfamily)
            lora.modules, failed = native_to_canonical(lora.modules, names, detect_block_diagonal=_may_be_split_qkv(source.metadata))
            lora.modules = dict(sorted(lora.modules.items()))
            keep_failed(failed, lora.unplaced, lora.issues)
        if family:
            fam, fam_evidence = family, ["given"]
        else:
            # kohya numbers the text encoders (lora_te1_) only in multi-encoder models; SD1/SD2 files use lora_te_
            numbered = not tfamily and any(name.startswith("lora_te1_") for name in groups)
            fam, fam_evidence = detect_family(lora, numbered_text_encoders=numbered)
        lora.family = fam
        lora.provenance.evidence = fam_evidence
        return lora

    @staticmethod
    def _transformer_family(source: Source, family: str | None) -> str | None:
        """``flux1``/``sd3`` when the ``lora_unet_`` bodies use BFL/SAI names (or TEs only and the family is known)."""
        if family in _TRANSFORMER_BODIES:
            return family
        if family:
            return None
        module = source.metadata.get("ss_network_module", "")
        if module.endswith(("lora_flux", "lora_sd3")):
            return "flux1" if module.endswith("lora_flux") else "sd3"
        found: set[str] = set()
        has_unet = has_te3 = False
        for key in source.tensors:
            if key.startswith("lora_unet_"):
                has_unet = True
                body = key[len("lora_unet_") :]
                for fam, starts in _TRANSFORMER_BODIES.items():
                    if body.startswith(starts):
                        found.add(fam)
            elif key.startswith("lora_te3_"):
                has_te3 = True
        if len(found) == 1:
            return found.pop()
        if not found and any(k.startswith("lora_unet_final_layer_") for k in source.tensors):
            claimed = family_from_metadata(source.metadata)
            return claimed if claimed in _TRANSFORMER_BODIES else "flux1"
        if not has_unet and has_te3:
            claimed = family_from_metadata(source.metadata)
            return claimed if claimed in _TRANSFORMER_BODIES else "sd3"
        return None

    @staticmethod
    def _transformer_path(prefix: str, body: str, tfamily: str) -> str | None:
        """Native (not yet canonical) path for a transformer-family module; split/renamed after assembly."""
        if prefix == "lora_unet":
            return f"transformer.{unflatten(body)}"
        dotted = unflatten(body)
        component = _TRANSFORMER_TEXT[tfamily][prefix]
        if tfamily == "flux1" and dotted.startswith("encoder.block."):
            component = "text_encoder_2"
        return f"{component}.{canonical_text_path(dotted)}"

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
        if family in _TRANSFORMER_BODIES or any(m.component == "transformer" for m in lora.modules.values()):
            return self._plan_transformer(lora, options, family)
        has_te2 = any(m.component == "text_encoder_2" for m in lora.modules.values())
        te1_prefix = "lora_te1" if (family == "sdxl" or has_te2) else "lora_te"
        out = PlannedFile(metadata=carried_metadata(lora))
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

    def _plan_transformer(self, lora: LoraFile, options: WriteOptions, family: str | None) -> WritePlan:
        """sd-scripts ``lora_flux`` / ``lora_sd3`` spelling: native transformer names, fused projections joined."""
        from lorafmt.errors import LossyConversionError, UnsupportedFeatureError

        if family is None:
            msg = "cannot write transformer modules as kohya without knowing the family (flux1 or sd3)"
            hint = "pass --family flux1 or --family sd3 (aMUSEd transformers have no kohya spelling: use diffusers or peft)"
            raise UnsupportedFeatureError(msg, file=lora.provenance.source if lora.provenance else None, hint=hint)
        if family not in _TRANSFORMER_BODIES:
            msg = f"the kohya layout spells Flux.1 and SD3 transformers only; family is {family!r}"
            raise UnsupportedFeatureError(msg, file=lora.provenance.source if lora.provenance else None, hint="write it as diffusers or peft")
        names = names_for(family)
        sets = {p: ([p], "a `set` (replacement) tensor is not expressible in kohya") for p, m in lora.modules.items() if m.mode == "set"}
        native, notes, failed = canonical_to_native({p: m for p, m in lora.modules.items() if p not in sets}, names)
        failed = {**sets, **failed}
        if failed:
            if not options.allow_lossy:
                first = sorted(failed)[0]
                msg = f"{len(failed)} module group(s) cannot be written as kohya {family}: {first}: {failed[first][1]}"
                raise LossyConversionError(msg, module=failed[first][0][0], hint="pass --allow-lossy to drop them (each is reported)")
            for npath, (paths, why) in sorted(failed.items()):
                for p in paths:
                    notes.append(issue("W001", f"dropped: {why}", module=p, severity="warning"))
        out = PlannedFile(metadata=carried_metadata(lora))
        plan = WritePlan(files={"": out}, notes=notes)
        text_prefix = _TRANSFORMER_TEXT_OUT[family]
        for path, module in native.items():
            component, rel = path.split(".", 1)
            if component == "transformer":
                prefix = "lora_unet"
            elif component in text_prefix:
                prefix = text_prefix[component]
            else:
                msg = f"the kohya layout has no prefix for component {component!r} in family {family}"
                raise UnsupportedFeatureError(msg, module=path)
            self._emit(out, f"{prefix}_{flatten(rel)}", module)
        return plan

    @staticmethod
    def _emit(out: PlannedFile, name: str, module) -> None:
        algo = get_algorithm(module.algorithm)
        for role, ref in module.tensors.items():
            param = algo.param_names[role]
            out.tensors[f"{name}.{param}"] = ref.renamed(f"{name}.{param}")
        if module.alpha is not None:
            dtype = alpha_dtype_for(module.alpha, module.alpha_dtype)
            out.tensors[f"{name}.alpha"] = alpha_tensor(module.alpha, dtype).renamed(f"{name}.alpha")
        if module.dora_scale is not None:
            out.tensors[f"{name}.dora_scale"] = module.dora_scale.renamed(f"{name}.dora_scale")
        for extra, ref in module.extras.items():
            out.tensors[f"{name}.{extra}"] = ref.renamed(f"{name}.{extra}")


def _may_be_split_qkv(metadata: dict[str, str]) -> bool:
    """Whether fused ``up`` matrices may be block-diagonal (sd-scripts ``split_qkv``): said by
    ``ss_network_args``, or unknown because the file has no sd-scripts metadata. Only then is ``up`` data read."""
    args = metadata.get("ss_network_args")
    if args:
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = {}
        if isinstance(parsed, dict):
            return str(parsed.get("split_qkv", "")).lower() == "true"
    return "ss_network_module" not in metadata


LAYOUT = KohyaLayout()
