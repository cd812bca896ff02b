"""BFL Flux Control LoRA layout (FLUX.1 Canny/Depth ``-lora`` files).

Produced by: Black Forest Labs (``flux1-canny-dev-lora``, ``flux1-depth-dev-lora``). Read by diffusers
(``_convert_bfl_flux_control_lora_to_diffusers``), ComfyUI (``convert_lora_bfl_control``), InvokeAI
(``is_state_dict_likely_flux_control``).

Key grammar: bare BFL module names (no prefix) with PEFT suffixes ``lora_A.weight``, ``lora_B.weight`` and
``lora_B.bias``; no alpha (scale 1); plus full QK-norm scale tensors ``<block>.<img|txt>_attn.norm.<query|key>_norm.scale``
/ ``single_blocks.N.norm.<query|key>_norm.scale``, which *replace* the base norm weights. ``img_in`` is widened:
its ``lora_A`` has 128 input features (latent + control channels) where the base ``x_embedder`` has 64; consumers pad
the base weight with zeros (ComfyUI ``reshape_weight``, diffusers ``_maybe_expand_transformer_param_shape``).

Canonical form: LoRA modules on diffusers names (fused ``qkv``/``linear1`` split exactly, ``lora_B.bias`` sliced
with the rows, ``final_layer.adaLN_modulation.1`` halves swapped into ``norm_out.linear``); each norm scale is a
module with algorithm ``full``, role ``diff`` holding the new weight, and ``mode="set"``
(``transformer.transformer_blocks.0.attn.norm_q`` …). The widened ``x_embedder`` LoRA is an ordinary module whose
input width (128) exceeds the base's — validation reports it; fuse must pad.

Capabilities: LoRA with lora_B bias, ``set`` norm scales; no alpha (scales folded into ``up`` on write); flux1
transformer only.

Example:
    >>> import lorafmt
    >>> lora = lorafmt.read("flux1-depth-dev-lora.safetensors")  # doctest: +SKIP
    >>> lora.modules["transformer.transformer_blocks.0.attn.norm_q"].mode  # doctest: +SKIP
    'set'
"""

from __future__ import annotations

import re

from lorafmt.algorithms import BUILTIN_ALGORITHMS
from lorafmt.errors import LossyConversionError
from lorafmt.families import detect_family
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match, PlannedFile, WriteOptions, WritePlan, refuse_unet_family
from lorafmt.layouts._common import ModuleParts, assemble, carried_metadata, issue
from lorafmt.layouts._transformer import canonicalize, emit, fold_scale
from lorafmt.naming.flux import FLUX_NAMES, is_bfl_path
from lorafmt.naming.fused import FusedError, canonical_to_native
from lorafmt.schema import LoraFile, Module, TensorRef

__all__ = ["LAYOUT", "BflControlLayout"]

_LORA_RE = re.compile(r"^(?:diffusion_model\.)?([A-Za-z0-9_.]+?)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)$")
_NORM_RE = re.compile(r"^(?:diffusion_model\.)?([A-Za-z0-9_.]+?_norm)\.scale$")
_ENDINGS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", "_norm.scale")  # what both regexes need
_PARAM = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "lora_B.bias": "lora_B.bias"}
_PARAMS_OUT = {"down": "lora_A.weight", "up": "lora_B.weight", "bias": "lora_B.bias"}


def _raw_module(key: str) -> str:
    m = _LORA_RE.match(key)
    return m.group(1) if m else key.rsplit(".", 1)[0]


class BflControlLayout(Layout):
    name = "bfl-control"
    aliases = ("flux-control", "bfl_control")
    description = "BFL Flux Control LoRA: bare BFL names + lora_A/lora_B/lora_B.bias, full QK-norm .scale tensors (set), widened img_in"
    capabilities = Capabilities(
        algorithms=frozenset({"lora"}),
        lora_bias=True,
        set_tensors=True,
        alpha="none",
        families=frozenset({"flux1"}),
        components=frozenset({"transformer"}),
    )

    def sniff(self, source: Source) -> Match | None:
        if source.kind == "dir" or not source.tensors:
            return None
        claimed = norms = bias = 0
        for key in source.tensors:
            if not key.endswith(_ENDINGS):
                continue
            m = _LORA_RE.match(key)
            if m and is_bfl_path(m.group(1)):
                claimed += 1
                bias += m.group(2) == "lora_B.bias"
            elif (n := _NORM_RE.match(key)) and is_bfl_path(n.group(1)):
                claimed += 1
                norms += 1
        if not claimed or (not (norms or bias) and any(k.startswith("diffusion_model.") for k in source.tensors)):
        # (``diffusion_model.`` + plain LoRA is the comfyui layout; bare names or bias/norm tensors are ours.)
            return None
        total = len(source.tensors)
        return Match(
            self.name,
            round(100 * claimed / total),
            [f"{claimed}/{total} keys are bare BFL names + lora_A/lora_B/lora_B.bias or *_norm.scale", f"{norms} norm scales, {bias} lora_B.bias"],
        )

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        groups: dict[str, ModuleParts] = {}
        unplaced: dict[str, TensorRef] = {}
        issues: list = []
        norms: dict[str, TensorRef] = {}
        for key, ref in source.tensors.items():
            m = _LORA_RE.match(key)
            if m and is_bfl_path(m.group(1)):
                path = f"transformer.{m.group(1)}"
                groups.setdefault(path, ModuleParts(path, m.group(1))).add(_PARAM[m.group(2)], ref)
                continue
            n = _NORM_RE.match(key)
            target = FLUX_NAMES.native(n.group(1)) if n else None
            if target is None:
                unplaced[key] = ref
                continue
            norms[f"transformer.{target.canonical[0]}"] = ref
        lora = assemble(groups, source, layout=self.name, unplaced=unplaced, issues=issues, evidence=[])
        canonicalize(lora, "flux1", detect_block_diagonal=True, raw_module=_raw_module)
        for path, ref in norms.items():
            if "full" not in BUILTIN_ALGORITHMS:
                lora.unplaced[ref.key] = ref
                lora.issues.append(issue("R008", "norm scale needs the `full` algorithm, not available", key=ref.key, module=path, severity="warning"))
                continue
            lora.modules[path] = Module(
                path=path, algorithm="full", tensors={"diff": ref}, alpha=None, alpha_dtype=None,
                dora_scale=None, dora_axis=None, extras={}, mode="set",
            )
        lora.modules = dict(sorted(lora.modules.items()))
        fam, fam_evidence = (family, ["given"]) if family else detect_family(lora)
        lora.family = fam or "flux1"
        lora.provenance.evidence = fam_evidence
        return lora

    def check_family(self, lora: LoraFile, family: str | None) -> None:
        refuse_unet_family(self, lora, family)
        super().check_family(lora, family)

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        native, notes, failed = canonical_to_native(lora.modules, FLUX_NAMES)
        dropped = dict(failed)
        out = PlannedFile(metadata=carried_metadata(lora))
        plan = WritePlan(files={"": out}, notes=notes)
        for path, module in native.items():
            component, rel = path.split(".", 1)
            if component != "transformer":
                dropped[path] = ([path], f"component {component!r} is not expressible in bfl-control")
                continue
            if module.mode == "set":
                if module.algorithm != "full" or not rel.endswith("_norm"):
                    dropped[path] = ([path], "only QK-norm scales can be set in bfl-control")
                    continue
                key = f"{rel}.scale"
                out.tensors[key] = module.tensors["diff"].renamed(key)
                continue
            if module.algorithm != "lora" or module.dora_scale is not None or "mid" in module.tensors:
                dropped[path] = ([path], f"{module.algorithm}{' DoRA' if module.dora_scale is not None else ''} is not expressible in bfl-control")
                continue
            try:
                folded, note = fold_scale(module)
            except FusedError as exc:
                dropped[path] = ([path], str(exc))
                continue
            if note:
                plan.notes.append(note)
            emit(out, rel, folded, _PARAMS_OUT, alpha=False, dora=None)
        if dropped:
            if not options.allow_lossy:
                first = sorted(dropped)[0]
                paths, why = dropped[first]
                msg = f"{len(dropped)} module group(s) cannot be written as bfl-control: {first}: {why}"
                raise LossyConversionError(msg, module=paths[0], hint="pass --allow-lossy to drop them (each is reported)")
            for _p, (paths, why) in sorted(dropped.items()):
                for p in paths:
                    plan.notes.append(issue("W001", f"dropped: {why}", module=p, severity="warning"))
        return plan


LAYOUT = BflControlLayout()
