"""``lorafmt fuse``: merge LoRAs into base weights (picked up by :mod:`lorafmt.cli` as an optional subcommand).

Example::

    lorafmt fuse sd15/unet/diffusion_pytorch_model.safetensors \\
        --lora style.safetensors:0.7 --lora detail.safetensors:-0.3 -o fused.safetensors

Exit 0 on success; 2 when the output was refused (no target, shape mismatch, non-finite result, existing
output without ``--force``) — nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fuse",
        help="merge LoRAs into base weights (diffusers component file, pipeline folder or single-file checkpoint)",
        description="Stream a base model tensor by tensor, adding scale * ΔW of each LoRA in float32; tensors no "
        "LoRA touches are copied byte for byte; non-finite results abort with no output.",
    )
    p.add_argument("base", help="diffusers component .safetensors, diffusers pipeline folder, or SD1/SD2/SDXL checkpoint")
    p.add_argument("--lora", action="append", required=True, metavar="PATH[:SCALE]",
                   help="a LoRA file (any layout) and its strength (default 1.0); repeat for several")
    p.add_argument("-o", "--output", required=True, help="output file (a folder for a pipeline base)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="write float tensors in this dtype")
    p.add_argument("--component", help="which component a component file holds (unet, transformer, text_encoder, ...)")
    p.add_argument("--family", help="the LoRAs' family when detection can't tell (sd1, sd2, sdxl, sd3, flux1)")
    p.add_argument("--unsafe", action="store_true", help="skip the finiteness check of fused tensors")
    p.add_argument("--allow-unmatched", action="store_true", help="fuse what matches, report LoRA modules with no target")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--json", action="store_true", help="print the fuse report as JSON")
    p.set_defaults(func=_run_fuse)


def _run_fuse(args: argparse.Namespace) -> int:
    from lorafmt.fuse import fuse, fuse_summary, parse_lora_arg

    loras = [parse_lora_arg(text) for text in args.lora]
    report = fuse(
        args.base,
        loras,
        args.output,
        device=args.device,
        dtype=args.dtype,
        component=args.component,
        family=args.family,
        unsafe=args.unsafe,
        allow_unmatched=args.allow_unmatched,
        force=args.force,
    )
    if args.json:
        sys.stdout.write(json.dumps(report.model_dump(), indent=2, default=str) + "\n")
        return 0
    sys.stdout.write(fuse_summary(report) + "\n")
    for note in report.notes:
        sys.stdout.write(f"  {note.severity}: [{note.code}] {note.message} ({note.module or note.key or '-'})\n")
    return 0
