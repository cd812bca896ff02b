"""PEFT layout: a folder with one sub-folder per component, each ``adapter_model.safetensors`` +
``adapter_config.json``, loadable by ``PeftModel.from_pretrained(component_model, folder/component)``.

Produced by: peft ``PeftModel.save_pretrained`` (``get_peft_model_state_dict`` strips the adapter name;
``save_and_load.py``). Also read: a bare ``base_model.model.…`` safetensors file (no config: scale 1), and
named-adapter keys (``.lora_A.default.weight``).

Key grammar: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_B.bias``,
``.lora_magnitude_vector`` for DoRA). Alpha lives in the config: ``lora_alpha``/``r`` with ``alpha_pattern`` /
``rank_pattern`` overrides and ``use_rslora``. CLIP keys are written as transformers 5 names them (no
``text_model.`` level); both spellings are read.

LoHa / LoKr (``LoHaConfig`` / ``LoKrConfig``): ``base_model.model.<module path>.hada_w1_a`` … / ``.lokr_w1`` …
(the LyCORIS parameter names, no ``.weight``); ``alpha``/``r`` with ``alpha_pattern``/``rank_pattern``,
``use_effective_conv2d`` (Tucker), and for LoKr ``decompose_both``/``decompose_factor``. PEFT rebuilds every
factor's shape from the config, so a module is written only when the config can reproduce its shapes exactly;
PEFT's LoKr scale is always ``alpha / r`` (full-matrix LoKr is written with ``alpha = r``, scale 1).

One adapter folder holds one adapter type: a component whose modules mix LoRA/LoHa/LoKr is refused for its
minority algorithm (see :meth:`PeftLayout.refusals`); ``--allow-lossy --approx-rank R`` turns those into LoRA.

Capabilities: LoRA, DoRA (output axis), lora_B bias, LoHa, LoKr, per-module alpha via config patterns.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from lorafmt.algorithms.dora import adopt_peft_magnitude, peft_magnitude_shape
from lorafmt.errors import SourceError
from lorafmt.families import AMUSED_ROOTS, detect_family
from lorafmt.io.source import Source
from lorafmt.layouts._base import Capabilities, Layout, Match, PlannedFile, WriteOptions, WritePlan
from lorafmt.layouts._common import ModuleParts, assemble, carried_metadata, issue
from lorafmt.naming.clip import canonical_text_path
from lorafmt.naming.shapes import linear_factor
from lorafmt.naming.peft_config import config_alpha, config_for_modules, pattern_value
from lorafmt.schema import LoraFile, Module, TensorRef


__all__ = ["LAYOUT", "PeftLayout"]

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_LYCORIS_PARAMS = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1_a", "lokr_w1_b", "lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_w2", "lokr_t2",
)
_KEY_RE = re.compile(
    r"^base_model\.model\.(.+?)\.(lora_A|lora_B|lora_magnitude_vector|" + "|".join(_LYCORIS_PARAMS) + r")"
    r"(?:\.([A-Za-z0-9_\-]+))??(?:\.(weight|bias))?$"
)
_PARAM = {
    ("lora_A", "weight"): "lora_down.weight",
    ("lora_B", "weight"): "lora_up.weight",
    ("lora_B", "bias"): "lora_B.bias",
    ("lora_magnitude_vector", None): "dora_scale",
    ("lora_magnitude_vector", "weight"): "dora_scale",
    **{(p, None): p for p in _LYCORIS_PARAMS},
}
_PEFT_TYPE = {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "add_embedding.", "conv_norm_out")
_TRANSFORMER_ROOTS = (
    "transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder", "proj_out", "norm_out",
    "time_text_embed.", "pos_embed",
    *AMUSED_ROOTS,  # UVit2DModel (aMUSEd)
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


# Components that are transformers' CLIPTextModel, which lost its `text_model.` level in transformers 5;
# CLIPTextModelWithProjection (SDXL's second encoder, SD3's and aMUSEd's encoders) keeps it. PEFT keys must
# follow the module names of the model they load into.
_FLAT_CLIP = {("sd1", "text_encoder"), ("sd2", "text_encoder"), ("sdxl", "text_encoder"), ("flux1", "text_encoder")}


def _flat_clip(family: str | None, component: str) -> bool:
    if family is None:
        return component == "text_encoder"
    return (family, component) in _FLAT_CLIP


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
        algorithms=frozenset({"lora", "loha", "lokr"}),
        dora_axes=frozenset({"out"}),
        lora_bias=True,
        alpha="config",
        families=frozenset({"sd1", "sd2", "sdxl", "sd3", "flux1", "amused"}),
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
            if cfg and cfg.get("peft_type") in ("LOHA", "LOKR"):
                _alpha_from_lycoris_config(module, rel, cfg)
            elif cfg and module.rank:
                try:
                    module.alpha = config_alpha(cfg, rel, module.rank)
                except ValueError as exc:  # a hand-edited or hostile config: the scale is unknown, say so
                    lora.issues.append(issue("R004", str(exc), key="adapter_config.json", module=path))
            adopt_peft_magnitude(module)
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
            groups.setdefault(path, ModuleParts(path, f"base_model.model.{parsed[0]}")).add(param, ref)
            if cfg:
                configs.setdefault(comp, cfg)

    def refusals(self, modules: dict[str, Module]) -> dict[str, str]:
        """Modules a PEFT folder cannot hold (beyond the capability table), with the reason.

        * one adapter type per component: the minority algorithms of a mixed component;
        * LoHa/LoKr with a DoRA magnitude (PEFT has DoRA for LoRA only);
        * LoHa/LoKr whose factor shapes the component's single config cannot rebuild (Tucker and plain k×k conv
          in one component, LoKr factorisations no common ``decompose_factor``/``r`` reproduces).
        """
        out: dict[str, str] = {}
        by_component: dict[str, dict[str, Module]] = {}
        for path, m in modules.items():
            by_component.setdefault(m.component, {})[path] = m
        for component, mods in by_component.items():
            algos = Counter(m.algorithm for m in mods.values())
            keep = max(algos, key=lambda a: (algos[a], a == "lora"))
            for path, m in mods.items():
                if m.algorithm != keep:
                    out[path] = (
                        f"component {component!r} mixes {', '.join(sorted(algos))}; a PEFT adapter folder holds one "
                        f"adapter type ({keep} kept)"
                    )
                elif m.algorithm != "lora" and m.dora_scale is not None:
                    out[path] = f"PEFT has no DoRA for {m.algorithm} (only LoraConfig(use_dora=True))"
            same = {p: m for p, m in mods.items() if p not in out and m.algorithm == keep}
            if keep == "loha":
                out.update(_loha_config(same)[1])
            elif keep == "lokr":
                out.update(_lokr_config(same)[1])
        return out

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        family = options.family or lora.family
        plan = WritePlan(directory=True)
        # PEFT itself only writes format=pt; the source's metadata rides along in each header (PEFT ignores it).
        metadata = carried_metadata(lora)
        metadata["format"] = "pt"
        per_component: dict[str, dict[str, tuple[int, float]]] = {}
        flags: dict[str, dict[str, bool]] = {}
        kinds: dict[str, dict[str, Module]] = {}
        for path, module in lora.modules.items():
            component, rel = path.split(".", 1)
            key_rel = rel[len("text_model.") :] if _flat_clip(family, component) and rel.startswith("text_model.") else rel
            out = plan.files.setdefault(f"{component}/adapter_model.safetensors", PlannedFile(metadata=metadata))
            base = f"base_model.model.{key_rel}"
            if module.algorithm in ("loha", "lokr"):
                from lorafmt.algorithms import get_algorithm

                names = get_algorithm(module.algorithm).param_names
                for role, ref in module.tensors.items():
                    out.tensors[f"{base}.{names[role]}"] = ref.renamed(f"{base}.{names[role]}")
                kinds.setdefault(component, {})[rel] = module
                continue
            kinds.setdefault(component, {})[rel] = module
            out.tensors[f"{base}.lora_A.weight"] = linear_factor(module.tensors["down"], path, family).renamed(f"{base}.lora_A.weight")
            up = linear_factor(module.tensors["up"], path, family)
            out.tensors[f"{base}.lora_B.weight"] = up.renamed(f"{base}.lora_B.weight")
            f = flags.setdefault(component, {"use_dora": False, "lora_bias": False})
            if "bias" in module.tensors:
                out.tensors[f"{base}.lora_B.bias"] = module.tensors["bias"].renamed(f"{base}.lora_B.bias")
                f["lora_bias"] = True
            if module.dora_scale is not None:
                mag = module.dora_scale
                mag = mag.reshape(peft_magnitude_shape(mag.numel, len(up.shape)))
                out.tensors[f"{base}.lora_magnitude_vector"] = mag.renamed(f"{base}.lora_magnitude_vector")
                f["use_dora"] = True
            rank = module.rank or 1
            per_component.setdefault(component, {})[rel] = (rank, module.alpha if module.alpha is not None else float(rank))
        common = {
            "base_model_name_or_path": None,
            "inference_mode": True,
            "modules_to_save": None,
            "task_type": None,
        }
        for component, mods in sorted(kinds.items()):
            algos = {m.algorithm for m in mods.values()}
            if len(algos) > 1:
                from lorafmt.errors import UnsupportedFeatureError

                msg = f"component {component!r} mixes {', '.join(sorted(algos))}; a PEFT adapter folder holds one adapter type"
                raise UnsupportedFeatureError(msg, module=f"{component}.{next(iter(mods))}")
            algo = algos.pop()
            te = component.startswith("text_encoder")
            if algo == "lora":
                cfg = {
                    "peft_type": "LORA",
                    "bias": "none",
                    "fan_in_fan_out": False,
                    "init_lora_weights": True,
                    "lora_dropout": 0.0,
                    "use_rslora": False,
                    **common,
                    **config_for_modules(per_component[component], text_encoder=te),
                    **flags[component],
                }
            else:
                fields, refused = (_loha_config if algo == "loha" else _lokr_config)({f"{component}.{r}": m for r, m in mods.items()})
                if refused:
                    from lorafmt.errors import UnsupportedFeatureError

                    path, why = sorted(refused.items())[0]
                    raise UnsupportedFeatureError(why, module=path)
                ranks = config_for_modules(fields.pop("modules"), text_encoder=te)
                ranks["alpha"] = ranks.pop("lora_alpha")
                cfg = {
                    "peft_type": _PEFT_TYPE[algo],
                    "init_weights": True,
                    "rank_dropout": 0.0,
                    "module_dropout": 0.0,
                    **common,
                    **ranks,
                    **fields,
                }
            plan.sidecars[f"{component}/adapter_config.json"] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
        return plan


# ------------------------------------------------------------------------------------------- LoHa / LoKr configs


def _alpha_from_lycoris_config(module: Module, rel: str, cfg: dict) -> None:
    """Canonical alpha from a LoHaConfig/LoKrConfig (PEFT scale = alpha / r, r per ``rank_pattern``)."""
    import numpy as np
    r_cfg = pattern_value(cfg.get("rank_pattern"), rel, cfg.get("r", 8))
    a_cfg = pattern_value(cfg.get("alpha_pattern"), rel, cfg.get("alpha", r_cfg))
    try:
        scale = float(a_cfg) / float(r_cfg)
    except (TypeError, ValueError, ZeroDivisionError):
        return
    if module.rank:
        module.alpha = scale * module.rank
    elif scale != 1.0 and module.algorithm == "lokr":
        # full-matrix LoKr: everyone else's scale is 1, PEFT's is alpha/r: fold it into w2 (computed tensor)
        role = "w2" if "w2" in module.tensors else "w1"
        ref = module.tensors[role]
        module.tensors[role] = TensorRef.from_array(ref.key, ref.float32() * np.float32(scale), ref.dtype)


def _looks_like_kxk_conv(path: str) -> bool:
    """k×k convolutions of the diffusers U-Net (conv_shortcut and proj_in/out are 1×1 or Linear)."""
    last = path.rsplit(".", 1)[-1]
    return last in ("conv1", "conv2", "conv", "conv_in", "conv_out")


def _loha_config(modules: dict[str, Module]) -> tuple[dict, dict[str, str]]:
    """LoHaConfig fields reproducing `modules` (path -> LoHa module), and the modules it cannot hold."""
    refused: dict[str, str] = {}
    tucker = any("t1" in m.tensors for m in modules.values())
    ranks: dict[str, tuple[int, float]] = {}
    for path, m in modules.items():
        if tucker and "t1" not in m.tensors and _looks_like_kxk_conv(path):
            refused[path] = "LoHa component mixes Tucker (hada_t1) and plain k×k conv factors; LoHaConfig's use_effective_conv2d is all or nothing"
            continue
        rank = m.rank or 1
        ranks[path.split(".", 1)[1]] = (rank, m.alpha if m.alpha is not None else float(rank))
    return {"modules": ranks, "use_effective_conv2d": tucker}, refused


def _lokr_fits(m: Module, factor: int, decompose_both: bool) -> tuple[int | None, str | None]:
    """(r for rank_pattern, None) when a LoKrConfig with `factor`/`decompose_both` rebuilds `m`'s shapes, else (None, why).

    PEFT (``LoKrLayer.update_layer``): ``(a, b) = factorization(out, f)``, ``(c, d) = factorization(in, f)``;
    w1 is full unless ``decompose_both and r < max(a, c) / 2``; w2 is full when ``r >= max(b, d) / 2``.
    """
    from lorafmt.algorithms.lokr import ALGORITHM as LOKR, factorization

    (a, c), (b, dflat, *k) = LOKR.kron_shapes(m)
    t = m.tensors
    flattened = not k and "w2" not in t and len(t["w2_b"].shape) == 2 and dflat % 9 == 0
    ds = [dflat, dflat // 9] if flattened else [dflat]  # a plain conv's w2_b is (r, d·kh·kw)
    d = next((x for x in ds if factorization(a * b, factor) == (a, b) and factorization(c * x, factor) == (c, x)), None)
    if d is None:
        return None, f"LoKr factors ({a}, {c}) ⊗ ({b}, {dflat}) are not PEFT's factorization with decompose_factor={factor}"
    if "w2" not in t:
        r = t["w2_a"].shape[0] if "t2" in t else t["w2_a"].shape[1]
    elif "w1_a" in t:
        r = t["w1_a"].shape[1]
    else:
        r = max(a, b, c, d)
    if "w1_a" in t and t["w1_a"].shape[1] != r:
        return None, "LoKr w1 and w2 factors have different ranks; LoKrConfig has one r per module"
    if (not (decompose_both and r < max(a, c) / 2)) != ("w1" in t):
        return None, f"LoKr w1 {'full' if 'w1' in t else 'factorised'} at r={r} cannot be rebuilt by a LoKrConfig with decompose_both={decompose_both}"
    if (r >= max(b, d) / 2) != ("w2" in t):
        return None, f"LoKr w2 {'full' if 'w2' in t else 'factorised'} at r={r} cannot be rebuilt by LoKrConfig (r >= max(b, d)/2 decides)"
    return r, None


def _lokr_config(modules: dict[str, Module]) -> tuple[dict, dict[str, str]]:
    """LoKrConfig fields reproducing `modules` (path -> LoKr module), and the modules it cannot hold."""
    from lorafmt.algorithms.lokr import ALGORITHM as LOKR

    decompose_both = any("w1_a" in m.tensors for m in modules.values())
    tucker = any("t2" in m.tensors for m in modules.values())
    candidates = [-1]
    for m in modules.values():
        (a, c), (b, d, *_k) = LOKR.kron_shapes(m)
        candidates += [x for x in (a, c) if x not in candidates]
    best: tuple[int, dict, dict] | None = None
    for factor in candidates:
        fits: dict[str, int] = {}
        why: dict[str, str] = {}
        for path, m in modules.items():
            r, reason = _lokr_fits(m, factor, decompose_both)
            if reason is None and tucker and "t2" not in m.tensors and "w2" not in m.tensors and _looks_like_kxk_conv(path):
                reason = "LoKr component mixes Tucker (lokr_t2) and plain k×k conv factors; use_effective_conv2d is all or nothing"
            if reason is None:
                fits[path] = r
            else:
                why[path] = reason
        if best is None or len(fits) > len(best[1]):
            best = (factor, fits, why)
        if not why:
            break
    factor, fits, why = best if best is not None else (-1, {}, {})
    ranks: dict[str, tuple[int, float]] = {}
    for path, r in fits.items():
        m = modules[path]
        alpha = (m.alpha if m.alpha is not None else float(r)) if m.rank else float(r)  # full-matrix: scale 1
        if m.rank and m.rank != r:
            alpha = alpha * r / m.rank
        ranks[path.split(".", 1)[1]] = (r, alpha)
    fields = {
        "modules": ranks,
        "decompose_both": decompose_both,
        "decompose_factor": factor,
        "use_effective_conv2d": tucker,
        "rank_dropout_scale": False,
    }
    return fields, why


LAYOUT = PeftLayout()
