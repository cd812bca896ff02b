"""The reference side of the benchmark: each job done with diffusers' (and PEFT's) own functions.

Run as a separate process per measurement, like ``lorafmt``, so imports count. Nothing here downloads:
U-Net configs are the published ones, passed in (see ``gen.py``).

    python benchmarks/diffusers_jobs.py kohya-to-diffusers SRC OUT_DIR --family sdxl
    python benchmarks/diffusers_jobs.py diffusers-to-kohya SRC OUT
    python benchmarks/diffusers_jobs.py kohya-to-peft SRC OUT_DIR --family sd1
    python benchmarks/diffusers_jobs.py flux-kohya-to-diffusers SRC OUT_DIR
    python benchmarks/diffusers_jobs.py fuse BASE LORA OUT --family sdxl
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gen import UNET_CONFIGS  # noqa: E402


def _pipeline(family: str):
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


def _unet_config(family: str) -> SimpleNamespace:
    # What `pipe.unet.config` holds; lora_state_dict only reads the block structure from it.
    cfg = dict(UNET_CONFIGS[family])
    cfg.setdefault("transformer_layers_per_block", 1)
    return SimpleNamespace(**cfg)


def _split(state_dict: dict, prefixes: tuple[str, ...]) -> dict[str, dict]:
    out: dict[str, dict] = {p: {} for p in prefixes}
    for key, value in state_dict.items():
        prefix, rest = key.split(".", 1)
        out[prefix][rest] = value
    return out


def kohya_to_diffusers(src: str, out_dir: str, family: str) -> None:
    """diffusers' kohya converter (`lora_state_dict`) + its writer (`save_lora_weights`), alphas as metadata."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    pipe = _pipeline(family)
    state_dict, alphas = pipe.lora_state_dict(src, unet_config=_unet_config(family))
    comps = ("unet", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "text_encoder")
    parts = _split(state_dict, comps)
    alpha = float(next(iter(alphas.values()))) if alphas else None
    rank = next(v.shape[0] for k, v in state_dict.items() if "down" in k)
    meta = {"r": rank, "lora_alpha": alpha or rank}
    kwargs = {
        "unet_lora_layers": convert_unet_state_dict_to_peft(parts["unet"]),
        "text_encoder_lora_layers": convert_state_dict_to_peft(parts["text_encoder"]),
        "unet_lora_adapter_metadata": meta,
        "text_encoder_lora_adapter_metadata": meta,
    }
    if family == "sdxl":
        kwargs["text_encoder_2_lora_layers"] = convert_state_dict_to_peft(parts["text_encoder_2"])
        kwargs["text_encoder_2_lora_adapter_metadata"] = meta
    pipe.save_lora_weights(out_dir, **kwargs)


def diffusers_to_kohya(src: str, out: str) -> None:
    """diffusers' PEFT->kohya converter (`convert_state_dict_to_kohya`) on a loaded diffusers file."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    # It writes diffusers block names (no SGM mapping) and alpha = rank: less than lorafmt does, never more.
    converted = convert_state_dict_to_kohya(load_file(src))
    save_file(converted, out)


def kohya_to_peft(src: str, out_dir: str, family: str) -> None:
    """kohya -> PEFT folder: diffusers' converter, then what `PeftModel.save_pretrained` writes per component."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from safetensors.torch import save_file

    pipe = _pipeline(family)
    state_dict, alphas = pipe.lora_state_dict(src, unet_config=_unet_config(family))
    comps = ("unet", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "text_encoder")
    parts = _split(state_dict, comps)
    rank = next(v.shape[0] for k, v in state_dict.items() if "down" in k)
    alpha = float(next(iter(alphas.values()))) if alphas else rank
    for comp in comps:
        conv = convert_unet_state_dict_to_peft if comp == "unet" else convert_state_dict_to_peft
        sd = conv(parts[comp])
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
        folder = os.path.join(out_dir, comp)
        os.makedirs(folder, exist_ok=True)
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets).save_pretrained(folder)
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in sd.items()}, os.path.join(folder, "adapter_model.safetensors"))


def flux_kohya_to_diffusers(src: str, out_dir: str) -> None:
    """diffusers' kohya Flux converter (splits qkv / linear1) + `save_lora_weights`."""
    from diffusers import FluxPipeline

    state_dict = FluxPipeline.lora_state_dict(src)
    if isinstance(state_dict, tuple):
        state_dict = state_dict[0]
    transformer = {k[len("transformer."):]: v for k, v in state_dict.items() if k.startswith("transformer.")}
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers=transformer)


def fuse(base: str, lora: str, out: str, family: str) -> None:
    """Load the U-Net (weights assigned into a meta-built model), load_lora_adapter -> fuse_lora -> unload -> save."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS[family])
    unet.load_state_dict(load_file(base), assign=True)
    state_dict, alphas = _pipeline(family).lora_state_dict(lora, unet_config=_unet_config(family))
    unet_sd = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    unet_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("unet.")}
    unet.load_lora_adapter(unet_sd, prefix="unet", network_alphas=unet_alphas or None, adapter_name="bench")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("job")
    p.add_argument("args", nargs="+")
    p.add_argument("--family", default="sdxl")
    a = p.parse_args()
    jobs = {
        "kohya-to-diffusers": lambda s, o: kohya_to_diffusers(s, o, a.family),
        "diffusers-to-kohya": diffusers_to_kohya,
        "kohya-to-peft": lambda s, o: kohya_to_peft(s, o, a.family),
        "flux-kohya-to-diffusers": flux_kohya_to_diffusers,
        "fuse": lambda b, l, o: fuse(b, l, o, a.family),
    }
    jobs[a.job](*a.args)


if __name__ == "__main__":
    main()
