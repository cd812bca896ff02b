"""The parity cells: (layout, family, library) -> does the library load lorafmt's output with lorafmt's ΔW?

Each cell builds a random LoRA on the real module names of a tiny real model (non-uniform alphas, some modules
without alpha), writes the *original* file in a source layout, converts it with ``lorafmt.convert(..., to=layout)``,
loads the original and lorafmt's output through the real library and compares every module's ΔW with lorafmt's
own (:func:`lorafmt.api.module_delta` of the original as lorafmt reads it).

diffusers, peft and lycoris-lora are test-only references. Used by ``test_parity_matrix.py`` and ``make_matrix.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import lorafmt
from lorafmt.api import module_delta
from lorafmt.schema import LoraFile, Module, TensorRef

RTOL, ATOL = 1e-4, 1e-6
LIBRARIES = ("diffusers", "peft", "lycoris")
FAMILIES = ("sd1", "sdxl", "flux1", "sd3")
# (layout of lorafmt's output, family, library); the original is kohya, except for the kohya row (diffusers).
# kohya Flux through diffusers is not a cell: diffusers' kohya-Flux converter hard-codes the 3072 width and asserts on
# a tiny transformer (tests/test_flux_diffusers.py covers it at full width from the state dict).
CELLS: list[tuple[str, str, str]] = [
    ("diffusers", "sd1", "diffusers"),
    ("diffusers", "sdxl", "diffusers"),
    ("diffusers", "flux1", "diffusers"),
    ("diffusers", "sd3", "diffusers"),
    ("kohya", "sd1", "diffusers"),
    ("kohya", "sdxl", "diffusers"),
    ("peft", "sd1", "peft"),
    ("peft", "sdxl", "peft"),
    ("peft", "flux1", "peft"),
    ("peft", "sd3", "peft"),
    ("kohya", "sd1", "lycoris"),
]


@dataclass
class Outcome:
    """``ours``/``original``: module paths the library got wrong (missing, extra or different ΔW); None: not read."""

    ours: list[str] | None
    original: list[str] | None
    modules: int
    ours_scale_only: bool = False  # every module of lorafmt's output the library gets wrong is off by a scale only
    original_scale_only: bool = False  # the same for the original
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if not self.ours and self.ours is not None:
            if self.original:
                return f"library-wrong ({len(self.original)})"
            return "exact"
        if self.ours is None:
            return "not-read"
        return f"fails ({len(self.ours)}{', scale only' if self.ours_scale_only else ''})"


# ----------------------------------------------------------------------------------------------- models


def _quiet() -> None:
    for name in ("diffusers", "peft", "lycoris", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _models(family: str, *, te_text_model: bool = False) -> dict:
    """component -> tiny real model with that family's module names."""
    if family == "sd1":
        from fixtures.make_tool_fixtures import build_sd1

        unet, te = build_sd1(te_text_model=te_text_model)
        return {"unet": unet, "text_encoder": te}
    if family == "sdxl":
        from fixtures.make_tool_fixtures import build_sdxl

        unet, te, te2 = build_sdxl()
        return {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
    if family == "flux1":
        from test_flux_diffusers import tiny_flux

        return {"transformer": tiny_flux()}
    if family == "sd3":
        from test_sd3_layouts import tiny_sd3

        return {"transformer": tiny_sd3()}
    raise ValueError(family)


def _names(models: dict) -> dict[str, str]:
    """lorafmt canonical path -> ``component.module name`` in the live model."""
    import torch

    from lorafmt.naming.clip import canonical_text_path

    out = {}
    for comp, model in models.items():
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                rel = canonical_text_path(name) if comp.startswith("text_encoder") else name
                out[f"{comp}.{rel}"] = f"{comp}.{name}"
    return out


def _shapes(models: dict) -> dict[str, tuple[int, ...]]:
    from tiny_models import linear_and_conv_shapes

    out = {}
    for comp, model in models.items():
        out.update(linear_and_conv_shapes(model, comp))
    return out


_UNET_PARTS = (".attn1.", ".attn2.", ".ff.", "proj_in", "proj_out", ".conv1", "time_emb_proj", "downsamplers", "upsamplers")


def _select(family: str, path: str) -> bool:
    if path.startswith("text_encoder"):
        return "self_attn" in path or ".mlp." in path
    if family == "sd1":
        return any(s in path for s in _UNET_PARTS)
    if family == "sdxl":  # a slice of the U-Net keeps PEFT's per-module pattern matching fast
        return path.startswith(("unet.down_blocks", "unet.mid_block.resnets")) and any(s in path for s in _UNET_PARTS)
    if family == "sd3":
        return "transformer_blocks" in path
    return True


def random_lora(family: str, shapes: dict, seed: int = 0) -> LoraFile:
    """Random LoRA on the selected modules: ranks 2/4, alphas 1/2/4/none/3 (non-uniform on purpose)."""
    rng = np.random.default_rng(seed)
    modules = {}
    alphas = [1.0, 2.0, 4.0, None, 3.0]
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        if not _select(family, path):
            continue
        rank = 4 if i % 3 else 2
        down_shape = (rank, shape[1], *shape[2:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        modules[path] = Module(
            path=path,
            tensors={
                "down": TensorRef.from_array("d", rng.standard_normal(down_shape) * 0.1, "F32"),
                "up": TensorRef.from_array("u", rng.standard_normal(up_shape) * 0.1, "F32"),
            },
            alpha=alphas[i % len(alphas)],
        )
    return LoraFile(family=family, modules=modules)


def _original(family: str, layout: str, models: dict, tmp: Path) -> Path:
    """The original file in ``layout`` (flux/sd3 kohya: written in sd-scripts' native names by the tests' own builders)."""
    if family == "flux1":
        from test_flux_diffusers import canonical_shapes, kohya_file, native_shapes

        kohya = kohya_file(tmp / "orig_kohya.safetensors", native_shapes(canonical_shapes(models["transformer"])))
        if layout == "kohya":
            return kohya
        out = tmp / f"orig_{layout}.safetensors"
        lorafmt.write(lorafmt.read(kohya), out, layout=layout)
        return out
    if family == "sd3":
        from test_sd3_layouts import kohya_sd3_file, model_shapes

        kohya = kohya_sd3_file(tmp / "orig_kohya.safetensors", model_shapes(models["transformer"]))
        assert layout == "kohya"
        return Path(kohya)
    out = tmp / f"orig_{layout}.safetensors"
    lorafmt.write(random_lora(family, _shapes(models)), out, layout=layout)
    return out


# ----------------------------------------------------------------------------------------------- library loaders


def _peft_deltas(model, adapter: str, prefix: str = "") -> dict[str, np.ndarray]:
    from tiny_models import peft_deltas

    return {n.removeprefix(prefix): d for n, d in peft_deltas(model, adapter).items()}


def diffusers_deltas(path: Path, family: str, models: dict, adapter: str) -> dict[str, np.ndarray]:
    """``component.module`` -> ΔW as diffusers' own pipeline loaders load ``path``."""
    _quiet()
    out = {}
    if family in ("sd1", "sdxl"):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionPipeline if family == "sd1" else StableDiffusionXLPipeline
        kw = {"unet_config": models["unet"].config} if family == "sdxl" else {}
        sd, alphas, meta = cls.lora_state_dict(str(path), return_lora_metadata=True, **kw)
        unet = models["unet"]
        cls.load_lora_into_unet(sd, alphas, unet, adapter_name=adapter, metadata=meta)
        out.update({f"unet.{n}": d for n, d in _peft_deltas(unet, adapter).items()})
        if any(n.startswith(("unet.",)) for n in out):
            unet.delete_adapters(adapter)
        for comp in ("text_encoder", "text_encoder_2"):
            if comp in models and any(k.startswith(f"{comp}.") for k in sd):
                cls.load_lora_into_text_encoder(sd, alphas, models[comp], prefix=comp, adapter_name=adapter, metadata=meta)
                # transformers 5.24 refuses delete_adapter with peft 0.21: a fresh adapter name per load instead
                out.update({f"{comp}.{n}": d for n, d in _peft_deltas(models[comp], adapter).items()})
        return out
    model = models["transformer"]
    if family == "flux1":
        from diffusers.loaders import FluxLoraLoaderMixin

        sd, alphas, meta = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
        FluxLoraLoaderMixin.load_lora_into_transformer(sd, alphas, model, adapter_name=adapter, metadata=meta)
    else:
        from diffusers.loaders import SD3LoraLoaderMixin

        sd, meta = SD3LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        SD3LoraLoaderMixin.load_lora_into_transformer(sd, model, adapter_name=adapter, metadata=meta)
    out = {f"transformer.{n}": d for n, d in _peft_deltas(model, adapter).items()}
    if out:
        model.delete_adapters(adapter)
    return out


def peft_folder_deltas(folder: Path, family: str) -> dict[str, np.ndarray]:
    """``component.module`` -> ΔW through ``PeftModel.from_pretrained(fresh model, folder/component)``."""
    from peft import PeftModel

    _quiet()
    out = {}
    for comp, model in _models(family).items():
        if not (folder / comp / "adapter_config.json").is_file():
            continue
        loaded = PeftModel.from_pretrained(model, str(folder / comp))
        out.update({f"{comp}.{n}": d for n, d in _peft_deltas(loaded, "default", "base_model.model.").items()})
    return out


_LYCORIS_CLASS_STATE = (
    "ENABLE_CONV", "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "TARGET_EXCLUDE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "TEXT_ENCODER_TARGET_REPLACE_NAME", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "USE_FNMATCH",
)


def lycoris_deltas(path: Path, models: dict) -> dict[str, np.ndarray]:
    """``component.module`` -> ΔW of every module lycoris' ``create_network_from_weights`` builds from ``path``.

    LyCORIS 4.1.3's default preset asserts on a diffusers U-Net ("duplicated lora name"), and
    ``create_network_from_weights`` builds a default network first: a preset without the overlap is applied
    beforehand (fixtures/README.md). ΔW is ``get_diff_weight`` (right for plain LoRA; checked against the forward
    pass by the test).
    """
    import torch
    from lycoris import kohya

    from fixtures.make_tool_fixtures import PRESETS, _reset_lycoris_class_state

    _quiet()
    cls = kohya.LycorisNetworkKohya
    saved = {a: getattr(cls, a) for a in _LYCORIS_CLASS_STATE}  # apply_preset mutates the class: restored below
    try:
        _reset_lycoris_class_state()
        cls.apply_preset(PRESETS["locon_sd"])
        unet, te = models["unet"], models["text_encoder"]
        network, _ = kohya.create_network_from_weights(1.0, str(path), None, te, unet)
        network.load_weights(str(path))
    finally:
        for a, v in saved.items():
            setattr(cls, a, v)
    names = {}
    for comp, prefix in (("unet", "lora_unet"), ("text_encoder", "lora_te")):
        for n, _m in models[comp].named_modules():
            names[f"{prefix}_{n}".replace(".", "_")] = f"{comp}.{n}"
    out = {}
    with torch.no_grad():
        for mod in network.unet_loras + network.text_encoder_loras:
            out[names[mod.lora_name]] = mod.get_diff_weight(1.0)[0].float().numpy()
    out["__network__"] = network  # type: ignore[assignment]  # for the test's forward-pass check
    return out


# ----------------------------------------------------------------------------------------------- comparing


def wrong_modules(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[str]:
    """Names (library spelling) whose ΔW is missing, extra or not within tolerance."""
    wrong = sorted(set(got) - set(expected))
    for name, d in expected.items():
        g = got.get(name)
        if g is None or g.size != d.size or not np.allclose(g.reshape(d.shape), d, rtol=RTOL, atol=ATOL):
            wrong.append(name)
    return sorted(wrong)


def scale_only(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], names: list[str]) -> bool:
    """Whether every module in ``names`` is loaded, non-zero and exactly a scalar multiple of the expected ΔW."""
    for name in names:
        if name not in expected or name not in got:
            return False
        d, g = expected[name], got[name].reshape(expected[name].shape)
        ratio = np.linalg.norm(g) / np.linalg.norm(d)
        if ratio < 1e-3 or not np.allclose(g, d * ratio, rtol=1e-3, atol=ATOL):
            return False
    return True


def _expected(original: Path, names: dict[str, str], family: str) -> dict[str, np.ndarray]:
    lora = lorafmt.read(original, family=family)
    # modules of components the tiny model set lacks (sd3 kohya text-encoder LoRAs) are left out
    return {names[p]: module_delta(m) for p, m in lora.modules.items() if p in names}


def run_cell(layout: str, family: str, library: str, tmp: Path) -> Outcome:
    """Run one cell in the empty folder ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    source = "diffusers" if layout == "kohya" else "kohya"
    models = _models(family, te_text_model=library == "lycoris")
    names = _names(models)
    original = _original(family, source, models, tmp)
    expected = _expected(original, names, family)
    ours = tmp / ("ours" if layout == "peft" else "ours.safetensors")
    lorafmt.convert(original, ours, to=layout, family=family)
    notes: list[str] = []
    scale: dict[str, bool] = {}

    def load(path: Path, adapter: str) -> list[str] | None:
        try:
            if library == "diffusers":
                got = diffusers_deltas(path, family, models, adapter)
            elif library == "peft":
                if not path.is_dir():
                    return None  # PeftModel.from_pretrained reads a folder
                got = peft_folder_deltas(path, family)
            else:
                if path.name.startswith("orig_") and source != "kohya":
                    return None  # lycoris-lora reads kohya only
                got = lycoris_deltas(path, models)
                got.pop("__network__")
        except Exception as exc:  # the library refused the file
            notes.append(f"{path.name}: {type(exc).__name__}: {str(exc)[:160]}")
            return None
        if not got:
            return None
        wrong = wrong_modules(expected, got)
        scale[adapter] = bool(wrong) and scale_only(expected, got, wrong)
        return wrong

    got_ours = load(ours, "ours")
    got_orig = load(original, "orig")
    return Outcome(got_ours, got_orig, len(expected), scale.get("ours", False), scale.get("orig", False), notes)


# ----------------------------------------------------------------------------------------------- matrix


def render(results: dict[tuple[str, str, str], Outcome]) -> str:
    """The support matrix as markdown (layout × family rows, one column per library)."""
    rows = sorted({(lay, fam) for lay, fam, _ in CELLS}, key=lambda r: (r[0], FAMILIES.index(r[1])))
    lines = [
        "| layout | family | " + " | ".join(LIBRARIES) + " |",
        "|---|---|" + "---|" * len(LIBRARIES),
    ]
    for lay, fam in rows:
        cells = []
        for lib in LIBRARIES:
            o = results.get((lay, fam, lib))
            cells.append("—" if o is None else o.status)
        lines.append(f"| {lay} | {fam} | " + " | ".join(cells) + " |")
    out = [
        "<!-- generated by tests/parity/make_matrix.py; checked by tests/parity/test_parity_matrix.py -->",
        "# Parity matrix",
        "",
        "lorafmt's output in each layout, loaded by the library, against lorafmt's own ΔW of every module",
        "(tiny models with the real module names; the original is a kohya file, a diffusers file for the kohya row).",
        "`exact`: the library reproduces lorafmt's ΔW for every module of lorafmt's output, and of the original",
        "where it reads the original (see the list below);",
        "`library-wrong (n)`: lorafmt's output loads exactly but the library mis-loads n modules of the original;",
        "`fails (n)`: n modules of lorafmt's output load wrong; `not-read`: the library loads nothing; `—`: the",
        "library does not read that layout. `scale only`: each wrong module is lorafmt's ΔW times a constant.",
        f"Generated with {_versions()}.",
        "",
        *lines,
        "",
        "kohya Flux through diffusers is not a cell: diffusers' kohya-Flux converter hard-codes the 3072 width and",
        "asserts on a tiny transformer (tests/test_flux_diffusers.py covers it at full width).",
        "",
    ]
    details = [line for key in CELLS if key in results for line in detail_lines(key, results[key])]
    out += ["## Modules the library gets wrong", "", *details, ""]
    return "\n".join(out)


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("diffusers", "peft", "lycoris-lora", "transformers", "torch"))


def detail_lines(key: tuple[str, str, str], o: Outcome) -> list[str]:
    """The markdown lines recording one cell's outcome and the modules the library gets wrong."""
    orig = "not read" if o.original is None else ("exact" if not o.original else f"{len(o.original)} wrong")
    ours = "not read" if o.ours is None else ("exact" if not o.ours else f"{len(o.ours)} wrong")
    details = [f"- {' × '.join(key)} ({o.modules} modules): lorafmt's output {ours}; original {orig}"]
    for label, wrong in (("original", o.original), ("lorafmt's output", o.ours)):
        if wrong:
            details.append(f"  - {label}: " + ", ".join(f"`{n}`" for n in wrong))
    return details
