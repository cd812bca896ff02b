"""inspect's terminal table, per-block plots (matplotlib), and progress bars that stay quiet unless asked."""

from __future__ import annotations

import io
import math
import sys

import numpy as np
import pytest

import lorafmt
from lorafmt.api import module_delta
from lorafmt.cli import main
from lorafmt.plot import block_of, block_stats, plot_lora, render_inspect
from lorafmt.progress import is_enabled, progress, progress_enabled
from lorafmt.testing import make_lora


def test_block_of_groups_by_repeated_unit():
    assert block_of("unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k") == "unet.down_blocks.1.attentions.0"
    assert block_of("unet.mid_block.attentions.0.proj_in") == "unet.mid_block.attentions.0"
    assert block_of("unet.up_blocks.3.resnets.2.conv1") == "unet.up_blocks.3.resnets.2"
    assert block_of("text_encoder.text_model.encoder.layers.11.mlp.fc2") == "text_encoder.layers.11"
    assert block_of("text_encoder_3.encoder.block.4.layer.0.SelfAttention.q") == "text_encoder_3.layers.4"
    assert block_of("transformer.single_transformer_blocks.37.proj_mlp") == "transformer.single_transformer_blocks.37"
    assert block_of("unet.conv_in") == "unet.conv_in"


def test_block_stats_norms_are_the_effective_delta_norms():
    lora = make_lora("sd1", modules=40, rank=4, alpha=2.0, seed=3)  # includes 1x1-conv proj_in/proj_out
    stats = block_stats(lora)
    assert sum(s.modules for s in stats) == 40
    for s in stats:
        mods = [m for p, m in lora.modules.items() if block_of(p) == s.block]
        direct = math.sqrt(sum(float(np.linalg.norm(module_delta(m).astype(np.float64))) ** 2 for m in mods))
        assert s.delta_norm == pytest.approx(direct, rel=1e-5) and s.mean_rank == 4.0
    order = [s.block for s in block_stats(make_lora("sdxl", modules=[
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "text_encoder_2.text_model.encoder.layers.3.mlp.fc1",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.1.attentions.0.proj_in",
        "text_encoder.text_model.encoder.layers.10.mlp.fc1",
        "text_encoder.text_model.encoder.layers.2.mlp.fc1",
    ]))]
    assert order == ["text_encoder.layers.2", "text_encoder.layers.10", "text_encoder_2.layers.3",
                     "unet.down_blocks.1.attentions.0", "unet.down_blocks.2.attentions.1",
                     "unet.mid_block.attentions.0", "unet.up_blocks.0.attentions.0"]


def test_plot_lora_writes_a_png(tmp_path):
    mpl_image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "l.safetensors"
    lorafmt.write(make_lora("sdxl", modules=30, rank=8, alpha=4.0), path, layout="kohya")
    out = plot_lora(path, tmp_path / "l.png")
    img = mpl_image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 1000
    assert img[..., :3].std() > 0.05  # something was drawn


def test_cli_inspect_plot_and_terminal_table(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "l.safetensors"
    lorafmt.write(make_lora("sd1", modules=6, metadata={"modelspec.title": "Pixel", "modelspec.trigger_phrase": "pxl"}),
                  path, layout="kohya")
    assert main(["inspect", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = capsys.readouterr().out
    assert plain.startswith("file ") and "\x1b[" not in plain

    class TTY(io.StringIO):
        def isatty(self):
            return True

    tty = TTY()
    monkeypatch.setattr(sys, "stdout", tty)
    assert main(["inspect", str(path)]) == 0
    text = tty.getvalue()
    assert "trigger words" in text and "pxl" in text and "sd1" in text


def test_render_inspect_rich_and_plain_say_the_same():
    d = {"path": "x.safetensors", "layout": "diffusers", "family": "sdxl", "algorithms": ["lora"],
         "components": {"unet": 3}, "modules": 3, "tensors": 6, "ranks": {"4": 3}, "alphas": {"4": 3},
         "dtypes": {"F16": 6}, "dora": False, "metadata": {"ss_network_dim": "4", "modelspec.title": "T" * 200},
         "unplaced_keys": ["junk.weight"], "issues": [{"code": "W9", "message": "odd", "module": "unet.x"}]}
    plain = render_inspect(d, plain=True)
    rich_text = render_inspect(d)
    colored = render_inspect(d, color=True)
    for text in (plain, rich_text):
        for needle in ("x.safetensors", "diffusers", "sdxl", "unet (3)", "4 ×3", "F16 ×6", "junk.weight", "[W9] odd", "dim 4"):
            assert needle in text, (needle, text)
    assert "\x1b[" in colored and "\x1b[" not in rich_text and "T" * 200 not in rich_text


def test_progress_is_silent_unless_enabled_and_on_a_terminal():
    items = list(range(5))
    assert progress(items, desc="x") is items  # library default: untouched, nothing drawn
    buf = io.StringIO()
    with progress_enabled(stream=buf):
        assert not is_enabled()  # not a TTY
        assert progress(items) is items
    with progress_enabled(stream=buf, force=True):
        assert is_enabled()
        assert list(progress(iter(items), total=5, desc="fusing", unit="tensor")) == items
    assert "fusing" in buf.getvalue() and "/5" in buf.getvalue()
    with progress_enabled(False, stream=buf, force=True):
        assert not is_enabled()
    assert not is_enabled()
