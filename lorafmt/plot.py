"""Seeing a LoRA: a readable terminal table of ``inspect`` results, and per-block rank / ΔW-norm bars.

* :func:`render_inspect` turns :func:`lorafmt.inspect`'s dict into text: a rich table when rich is installed
  (colour only when asked), aligned plain text otherwise.
* :func:`block_stats` groups modules into blocks (``unet.down_blocks.1.attentions.0``,
  ``text_encoder.layers.7``, ``transformer.single_transformer_blocks.12``) and gives each its module count,
  mean rank and the Frobenius norm of its effective ΔW (scale included).
* :func:`plot_lora` draws those as horizontal bars into a PNG (matplotlib, ``pip install "lorafmt[plot]"``), so
  you can see where a LoRA acts. It uses matplotlib's object API (no pyplot state, no display needed).

Example:
    >>> from lorafmt.testing import make_lora
    >>> stats = block_stats(make_lora("sd1", modules=3, rank=4, alpha=4.0))
    >>> [(s.block, s.modules, s.mean_rank) for s in stats]
    [('unet.down_blocks.0.attentions.0', 3, 4.0)]
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["render_inspect", "block_stats", "BlockStat", "plot_lora", "block_of"]

_COMPONENT_ORDER = {"text_encoder": 0, "text_encoder_2": 1, "text_encoder_3": 2, "unet": 3, "transformer": 3}
_BLOCK_RES = [
    re.compile(r"^(unet\.(?:down_blocks|up_blocks)\.\d+\.(?:attentions|resnets|downsamplers|upsamplers)\.\d+)"),
    re.compile(r"^(unet\.mid_block\.(?:attentions|resnets)\.\d+)"),
    re.compile(r"^(transformer\.(?:transformer_blocks|single_transformer_blocks|joint_blocks)\.\d+)"),
    re.compile(r"^(text_encoder(?:_\d)?)\.text_model\.encoder\.layers\.(\d+)"),
    re.compile(r"^(text_encoder(?:_\d)?)\.encoder\.block\.(\d+)"),
]
_DOWN_UP = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def block_of(path: str) -> str:
    """The block a canonical module path belongs to (its path up to the repeated unit).

    Example:
        >>> block_of("text_encoder_2.text_model.encoder.layers.7.mlp.fc1")
        'text_encoder_2.layers.7'
    """
    for rx in _BLOCK_RES:
        m = rx.match(path)
        if m:
            return m.group(1) if m.lastindex == 1 else f"{m.group(1)}.layers.{m.group(2)}"
    comp, _, rest = path.partition(".")
    return f"{comp}.{rest.split('.', 1)[0]}" if rest else comp


def _natural(block: str) -> tuple:
    comp = block.split(".", 1)[0]
    parts = []
    for tok in re.split(r"(\d+)", block):
        if tok.isdigit():
            parts.append((1, int(tok)))
        elif tok:
            stage = next((v for k, v in _DOWN_UP.items() if k in tok), -1)
            parts.append((0, stage, tok))
    return (_COMPONENT_ORDER.get(comp, 9), comp, parts)


@dataclass(frozen=True)
class BlockStat:
    """One block: how many modules it adapts, their mean rank (None: rank-less), and ‖ΔW‖_F of all of them."""

    block: str
    modules: int
    mean_rank: float | None
    delta_norm: float


def _delta_norm(module: Any) -> float:
    """‖ΔW‖_F, without materialising ΔW for plain LoRA: ‖U D‖² = tr((UᵀU)(D Dᵀ))."""
    import numpy as np

    if module.algorithm == "lora" and "mid" not in module.tensors:
        up = module.tensors["up"].float32().reshape(module.tensors["up"].shape[0], -1).astype(np.float64)
        down = module.tensors["down"].float32().reshape(module.tensors["down"].shape[0], -1).astype(np.float64)
        sq = float(np.sum((up.T @ up) * (down @ down.T)))
        return math.sqrt(max(sq, 0.0)) * abs(module.scale)
    from lorafmt.api import module_delta

    return float(np.linalg.norm(module_delta(module).astype(np.float64).reshape(-1)))


def block_stats(lora: Any, *, norms: bool = True) -> list[BlockStat]:
    """Per-block module count, mean rank and ΔW norm, in model order (text encoders, then U-Net/transformer
    from input to output). `norms=False` skips reading tensor data (header only; norms are 0)."""
    import statistics

    groups: dict[str, list[Any]] = {}
    for path, module in lora.modules.items():
        groups.setdefault(block_of(path), []).append(module)
    out = []
    for block in sorted(groups, key=_natural):
        mods = groups[block]
        ranks = [m.rank for m in mods if m.rank]
        norm = math.sqrt(sum(_delta_norm(m) ** 2 for m in mods)) if norms else 0.0
        out.append(BlockStat(block, len(mods), float(statistics.fmean(ranks)) if ranks else None, norm))
    return out


def plot_lora(lora: Any, out_png: str | os.PathLike, *, title: str | None = None, dpi: int = 110) -> str:
    """Draw per-block rank and ΔW-norm bars for `lora` (a LoraFile or anything :func:`lorafmt.read` takes).

    Returns the path written (atomically). Raises :class:`lorafmt.errors.SourceError` naming the ``plot`` extra
    when matplotlib is missing.

    Example:
        >>> plot_lora("my_lora.safetensors", "my_lora.png")  # doctest: +SKIP
        'my_lora.png'
    """
    from lorafmt.errors import SourceError

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SourceError("plotting needs matplotlib", hint='install it with: pip install "lorafmt[plot]"') from None
    from lorafmt.schema import LoraFile

    if not isinstance(lora, LoraFile):
        from lorafmt.api import read

        lora = read(lora)
    import numpy as np

    stats = block_stats(lora)
    if not stats:
        raise SourceError("the LoRA has no modules to plot", file=lora.provenance.source)
    n = len(stats)
    height = max(2.5, 0.22 * n + 1.4)
    fig = Figure(figsize=(11, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_rank, ax_norm = fig.subplots(1, 2, sharey=True, width_ratios=[1, 2])
    y = np.arange(n)
    labels = [f"{s.block}  ({s.modules})" for s in stats]
    comps = [s.block.split(".", 1)[0] for s in stats]
    palette = {c: f"C{i}" for i, c in enumerate(dict.fromkeys(comps))}
    colors = [palette[c] for c in comps]
    ax_rank.barh(y, [s.mean_rank or 0 for s in stats], color=colors)
    ax_rank.set_yticks(y, labels, fontsize=7)
    ax_rank.invert_yaxis()
    ax_rank.set_xlabel("mean rank")
    ax_norm.barh(y, [s.delta_norm for s in stats], color=colors)
    ax_norm.set_xlabel("‖ΔW‖ (Frobenius, scale included)")
    for ax in (ax_rank, ax_norm):
        ax.grid(axis="x", alpha=0.3)
    name = title or os.path.basename(lora.provenance.source or "LoRA")
    fig.suptitle(f"{name}: {lora.family or 'unknown family'}, {len(lora.modules)} modules in {n} blocks", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    from lorafmt.io.atomic import atomic_output
    from pathlib import Path

    with atomic_output(Path(out_png), force=True) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
    return os.fspath(out_png)


# ------------------------------------------------------------------------------------------- inspect table


def _counts(d: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in d.items()) or "-"


def _rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("file", str(info.get("path") or "-")),
        ("layout", str(info.get("layout") or "-")),
        ("family", str(info.get("family") or "unknown")),
        ("algorithms", ", ".join(info.get("algorithms") or []) or "-"),
        ("components", ", ".join(f"{k} ({v})" for k, v in (info.get("components") or {}).items()) or "-"),
        ("modules", f"{info.get('modules', 0)} modules, {info.get('tensors', 0)} tensors"),
        ("ranks", _counts(info.get("ranks") or {})),
        ("alphas", _counts(info.get("alphas") or {})),
        ("dtypes", _counts(info.get("dtypes") or {})),
        ("DoRA", "yes" if info.get("dora") else "no"),
    ]
    unplaced = info.get("unplaced_keys") or []
    if unplaced:
        rows.append(("unplaced", f"{len(unplaced)} keys, e.g. {', '.join(unplaced[:3])}"))
    for d in (info.get("issues") or [])[:10]:
        rows.append(("issue", f"[{d.get('code')}] {d.get('message')} ({d.get('module') or d.get('key') or '-'})"))
    return rows


def _known(metadata: dict[str, str]) -> list[tuple[str, str]]:
    from lorafmt.metadata import KnownMetadata

    km = KnownMetadata.from_metadata(metadata)
    out = []
    for label, value in (
        ("title", km.title),
        ("architecture", km.architecture),
        ("base model", km.base_model_version),
        ("trigger words", ", ".join(km.trigger_words) or None),
        ("resolution", "x".join(map(str, km.resolution)) if km.resolution else None),
        ("network", " ".join(x for x in (km.network_module, km.network_dim and f"dim {km.network_dim}",
                                          km.network_alpha is not None and f"alpha {km.network_alpha:g}") if x) or None),
        ("hash", (km.model_hash or km.hash_sha256 or "")[:18] or None),
    ):
        if value:
            out.append((label, str(value)))
    return out


def render_inspect(info: dict[str, Any], *, color: bool = False, width: int | None = None, plain: bool = False) -> str:
    """A readable table of :func:`lorafmt.inspect` output (rich when installed and not `plain`; aligned text
    otherwise). `color` adds ANSI styles (for a terminal); the text is the same either way.

    Example:
        >>> print(render_inspect({"path": "a.safetensors", "layout": "kohya", "family": "sd1", "modules": 2,
        ...                       "tensors": 6, "ranks": {"4": 2}, "metadata": {}}, plain=True))
        file        a.safetensors
        layout      kohya
        family      sd1
        algorithms  -
        components  -
        modules     2 modules, 6 tensors
        ranks       4 ×2
        alphas      -
        dtypes      -
        DoRA        no
    """
    rows = _rows(info)
    meta = info.get("metadata") or {}
    known = _known(meta) if meta else []
    shown_meta = sorted(meta.items())[:12]
    if not plain:
        try:
            from rich import box
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if plain:
        lines = [f"{k:<11} {v}" for k, v in rows]
        if known:
            lines.extend(f"{k:<11} {v}" for k, v in known)
        if meta:
            lines.append(f"{'metadata':<11} {len(meta)} keys")
            lines.extend(f"  {k} = {v if len(v) <= 60 else v[:57] + '...'}" for k, v in shown_meta)
        return "\n".join(lines)
    table = Table(box=box.SIMPLE_HEAD, show_header=False, pad_edge=False, expand=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, v, style="yellow" if k in ("issue", "unplaced") else None)
    if known:
        table.add_section()
        for k, v in known:
            table.add_row(k, v)
    if meta:
        table.add_section()
        table.add_row("metadata", f"{len(meta)} keys" + (" (first 12)" if len(meta) > 12 else ""))
        for k, v in shown_meta:
            table.add_row(f"  {k}", v if len(v) <= 80 else v[:77] + "...", style="dim")
    buf = io.StringIO()
    console = Console(file=buf, width=width or 110, force_terminal=color, color_system="standard" if color else None,
                      no_color=not color, highlight=False)
    console.print(table)
    return buf.getvalue().rstrip("\n")
