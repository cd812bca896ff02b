"""diffusers legacy layouts (read only): ``.lora.down/.lora.up`` and the attention-processor spelling.

Produced by: old diffusers ``save_attn_procs`` (``…attn1.processor.to_q_lora.down.weight``, with or without the
``unet.`` prefix) and the ``LoRACompatible`` era training scripts (``unet.….to_q.lora.down.weight``,
``text_encoder.….q_proj.lora_linear_layer.down.weight``). diffusers >= 0.33 no longer loads un-prefixed
attention-processor files (formats.md §3.8); this reader does.

Key grammar: optional component prefix, module path, then ``.lora.{down,up}.weight``,
``.lora_linear_layer.{down,up}.weight``, or ``.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight``.
No alpha is stored: scale is 1.
"""

from __future__ import annotations

import re

from lorafmt.families import detect_family
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match
from lorafmt.layouts._common import ModuleParts, assemble
from lorafmt.naming.clip import canonical_text_path
from lorafmt.schema import LoraFile, TensorRef

__all__ = ["LAYOUT", "DiffusersLegacyLayout"]

_PREFIX = r"(?:(unet|transformer|text_encoder|text_encoder_2|text_encoder_3)\.)?"
_LORA_RE = re.compile(rf"^{_PREFIX}(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_PROC_RE = re.compile(rf"^{_PREFIX}(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# diffusers' PEFT_TO_DIFFUSERS table only renames attention projections, so legacy files written by its training
# scripts keep `lora_A`/`lora_B` on every other module (text-encoder fc1/fc2, ff): read those too (formats.md §3.9).
_PEFT_RE = re.compile(rf"^{_PREFIX}(.+?)\.lora_(A|B)\.weight$")
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_ROLE_PARAM = {"down": "lora_down.weight", "up": "lora_up.weight"}


def _parse(key: str) -> tuple[str, str] | None:
    """key -> (canonical module path, lycoris param)."""
    m = _PROC_RE.match(key)
    if m:
        component, body, proj, role = m.groups()
        is_text = (component or "").startswith("text_encoder") or ".self_attn" in body or body.startswith("text_model")
        component = component or ("text_encoder" if is_text else "unet")
        table = _TE_PROJ if is_text else _UNET_PROJ
        path = f"{body}.{table[proj]}"
        if is_text:
            path = canonical_text_path(path)
        return f"{component}.{path}", _ROLE_PARAM[role]
    m = _LORA_RE.match(key)
    if m:
        component, body, role = m.groups()
        is_text = (component or "").startswith("text_encoder") or body.startswith(("text_model", "encoder.layers"))
        component = component or ("text_encoder" if is_text else "unet")
        if is_text:
            body = canonical_text_path(body)
        return f"{component}.{body}", _ROLE_PARAM[role]
    m = _PEFT_RE.match(key)
    if m:
        component, body, ab = m.groups()
        is_text = (component or "").startswith("text_encoder") or body.startswith(("text_model", "encoder.layers"))
        component = component or ("text_encoder" if is_text else "unet")
        if is_text:
            body = canonical_text_path(body)
        return f"{component}.{body}", _ROLE_PARAM["down" if ab == "A" else "up"]
    return None


# Every legacy spelling ends in one of these (a cheap test before the regexes, which scan the whole key).
_LEGACY_ENDINGS = (".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight",
                   ".lora_linear_layer.up.weight", "_lora.down.weight", "_lora.up.weight")


def _is_legacy_spelling(key: str) -> bool:
    return key.endswith(_LEGACY_ENDINGS) and bool(_PROC_RE.match(key) or _LORA_RE.match(key))


class DiffusersLegacyLayout(Layout):
    name = "diffusers-legacy"
    aliases = ("diffusers-old", "attn-procs")
    description = "old diffusers: .lora.down/.lora.up, lora_linear_layer, attention-processor to_q_lora (read only)"
    capabilities = Capabilities(writable=False, alpha="none")

    def sniff(self, source: Source) -> Match | None:
        if source.kind == "dir" or not source.tensors:
            return None
        # lora_A/lora_B keys count only beside legacy spellings: alone they are the `diffusers` layout.
        if not any(_is_legacy_spelling(k) for k in source.tensors):
            return None
        claimed = sum(1 for k in source.tensors if _parse(k) is not None)
        procs = sum(1 for k in source.tensors if "_lora." in k)
        evidence = [f"{claimed}/{len(source.tensors)} keys end in .lora.down/.lora.up or *_lora.down/up"]
        if procs:
            evidence.append(f"{procs} attention-processor keys")
        return Match(self.name, round(100 * claimed / len(source.tensors)), evidence)

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        groups: dict[str, ModuleParts] = {}
        unplaced: dict[str, TensorRef] = {}
        for key, ref in source.tensors.items():
            parsed = _parse(key)
            if parsed is None:
                unplaced[key] = ref
                continue
            path, param = parsed
            groups.setdefault(path, ModuleParts(path, key.rsplit(".", 3)[0])).add(param, ref)
        lora = assemble(groups, source, layout=self.name, unplaced=unplaced, issues=[], evidence=[])
        fam, fam_evidence = (family, ["given"]) if family else detect_family(lora)
        lora.family = fam
        lora.provenance.evidence = fam_evidence
        return lora


LAYOUT = DiffusersLegacyLayout()
