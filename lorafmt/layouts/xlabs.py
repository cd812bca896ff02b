"""XLabs x-flux layout (Flux.1 attention-processor LoRAs).

Produced by: XLabs-AI/x-flux ``train_flux_lora_deepspeed.py`` (``DoubleStreamBlockLoraProcessor``,
``SingleStreamBlockLoraProcessor``). Read by diffusers (``_convert_xlabs_flux_lora_to_diffusers``), ComfyUI
(USO variant), InvokeAI, x-flux itself.

Key grammar: ``[diffusion_model.]double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` (1 = image
stream, 2 = text stream) and ``single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight``. No alpha (x-flux
never serialises one: scale 1). ``qkv_lora*`` are fused q/k/v (split exactly on read, joined on write);
single-block ``qkv_lora`` covers only the q/k/v rows of ``linear1``.

Capabilities: LoRA on attention q/k/v/out only; no alpha (a module's scale is folded into ``up`` on write, exact —
in F32 when it is not a power of two); flux1 transformer only.

Example:
    >>> import lorafmt
    >>> lorafmt.convert("xlabs_lora.safetensors", "diffusers.safetensors", to="diffusers")  # doctest: +SKIP
"""

from __future__ import annotations

import re

from lorafmt.errors import LossyConversionError, UnsupportedFeatureError
from lorafmt.families import detect_family
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match, PlannedFile, WriteOptions, WritePlan, refuse_unet_family
from lorafmt.layouts._common import ModuleParts, assemble, carried_metadata, issue
from lorafmt.layouts._transformer import emit, fold_scale
from lorafmt.naming.flux import XLABS_NAMES
from lorafmt.naming.fused import FusedError, canonical_to_native, keep_failed, native_to_canonical
from lorafmt.schema import LoraFile, TensorRef

__all__ = ["LAYOUT", "XLabsLayout"]

_KEY_RE = re.compile(
    r"^(diffusion_model\.)?((?:double_blocks\.\d+\.processor\.(?:qkv|proj)_lora[12])|(?:single_blocks\.\d+\.processor\.(?:qkv|proj)_lora))"
    r"\.(down|up)\.weight$"
)
_PARAM = {"down": "lora_down.weight", "up": "lora_up.weight"}


def _raw_module(key: str) -> str:
    return key.rsplit(".", 2)[0]


class XLabsLayout(Layout):
    name = "xlabs"
    aliases = ("x-flux",)
    description = "XLabs x-flux: double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight (no alpha)"
    capabilities = Capabilities(
        algorithms=frozenset({"lora"}),
        alpha="none",
        families=frozenset({"flux1"}),
        components=frozenset({"transformer"}),
        metadata=True,
    )

    def sniff(self, source: Source) -> Match | None:
        if source.kind == "dir" or not source.tensors:
            return None
        claimed = sum(1 for k in source.tensors if _KEY_RE.match(k))
        if not claimed:
            return None
        total = len(source.tensors)
        return Match(self.name, round(100 * claimed / total), [f"{claimed}/{total} keys are <block>.processor.<qkv|proj>_lora.<down|up>.weight"])

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        groups: dict[str, ModuleParts] = {}
        unplaced: dict[str, TensorRef] = {}
        for key, ref in source.tensors.items():
            m = _KEY_RE.match(key)
            if not m:
                unplaced[key] = ref
                continue
            prefix, native, param = m.groups()
            path = f"transformer.{native}"
            groups.setdefault(path, ModuleParts(path, f"{prefix or ''}{native}")).add(_PARAM[param], ref)
        lora = assemble(groups, source, layout=self.name, unplaced=unplaced, issues=[], evidence=[])
        modules, failed = native_to_canonical(lora.modules, XLABS_NAMES, detect_block_diagonal=True)
        lora.modules = dict(sorted(modules.items()))
        keep_failed(failed, lora.unplaced, lora.issues, _raw_module)
        fam, fam_evidence = (family, ["given"]) if family else detect_family(lora)
        lora.family = fam or "flux1"
        lora.provenance.evidence = fam_evidence if fam else ["XLabs processor names -> flux1"]
        return lora

    def check_family(self, lora: LoraFile, family: str | None) -> None:
        refuse_unet_family(self, lora, family)
        super().check_family(lora, family)

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        native, notes, failed = canonical_to_native(lora.modules, XLABS_NAMES)
        dropped = dict(failed)
        out = PlannedFile(metadata=carried_metadata(lora))
        plan = WritePlan(files={"": out}, notes=notes)
        for path, module in native.items():
            component, rel = path.split(".", 1)
            if component != "transformer":
                dropped[path] = ([path], f"component {component!r} is not expressible in xlabs")
                continue
            if module.dora_scale is not None:
                dropped[path] = ([path], "DoRA is not expressible in xlabs")
                continue
            try:
                folded, note = fold_scale(module)
            except FusedError as exc:
                dropped[path] = ([path], str(exc))
                continue
            if note:
                plan.notes.append(note)
            emit(out, rel, folded, {"down": "down.weight", "up": "up.weight"}, alpha=False, dora=None)
        if dropped:
            if not options.allow_lossy:
                first = sorted(dropped)[0]
                paths, why = dropped[first]
                msg = f"{len(dropped)} module group(s) cannot be written as xlabs: {first}: {why}"
                raise LossyConversionError(msg, module=paths[0], hint="pass --allow-lossy to drop them (each is reported)")
            for _p, (paths, why) in sorted(dropped.items()):
                for p in paths:
                    plan.notes.append(issue("W001", f"dropped: {why}", module=p, severity="warning"))
        if not out.tensors:
            msg = "nothing left to write as xlabs (it holds only attention q/k/v/out LoRAs of Flux.1)"
            raise UnsupportedFeatureError(msg)
        return plan


LAYOUT = XLabsLayout()
