"""Parity suite (issue #9): lorafmt's output in each layout that diffusers / peft / lycoris-lora read loads through
that library with exactly lorafmt's ΔW per module; where the library mis-loads the original, the modules are
recorded in MATRIX.md (regenerate with ``PYTHONPATH=. python tests/parity/make_matrix.py``).

diffusers, peft and lycoris-lora are test-only references; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.parity,
    # the libraries warn at length about the keys they ignore; the outcomes are what this suite records
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("lycoris")

import parity_cells as cells  # noqa: E402

MATRIX = Path(__file__).resolve().parent / "MATRIX.md"

# Cells where lorafmt's output does not load with lorafmt's ΔW, and why. Each must stay as MATRIX.md records it.
KNOWN_FAILURES = {
    ("kohya", "sd1", "diffusers"): "diffusers' kohya reader gives modules whose alpha is not the file's most common "
    "one the common alpha (scale only; the original diffusers file loads exactly)",
    ("kohya", "sdxl", "diffusers"): "diffusers' kohya reader: the same alpha bug as for sd1",
}


def _matrix_row(layout: str, family: str) -> dict[str, str]:
    lines = MATRIX.read_text(encoding="utf-8").splitlines()
    header = next(line for line in lines if line.startswith("| layout |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for line in lines:
        cells_ = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells_[:2] == [layout, family]:
            return dict(zip(cols, cells_))
    raise AssertionError(f"MATRIX.md has no row {layout} × {family}; rerun tests/parity/make_matrix.py")


@pytest.mark.parametrize("key", cells.CELLS, ids=["-".join(k) for k in cells.CELLS])
def test_cell(key, tmp_path, parity_results):
    layout, family, library = key
    outcome = cells.run_cell(layout, family, library, tmp_path)
    parity_results[key] = outcome
    assert outcome.modules > 0
    assert outcome.ours is not None, f"{library} read nothing of lorafmt's {layout} output: {outcome.notes}"
    # MATRIX.md is current: the cell's status and its list of wrongly loaded modules
    assert _matrix_row(layout, family)[library] == outcome.status, "rerun tests/parity/make_matrix.py"
    text = MATRIX.read_text(encoding="utf-8")
    for line in cells.detail_lines(key, outcome):
        assert line in text.splitlines(), f"MATRIX.md is stale for {key}; rerun tests/parity/make_matrix.py"
    if outcome.original:  # where the library mis-loads the original, it does so by a scale only (its alpha bug)
        assert outcome.original_scale_only, outcome.original
    if key in KNOWN_FAILURES:
        assert outcome.ours, f"{key} now loads exactly: drop it from KNOWN_FAILURES"
        pytest.xfail(KNOWN_FAILURES[key])
    assert outcome.ours == [], outcome.ours


def test_matrix_lists_exactly_the_cells():
    lines = [line for line in MATRIX.read_text(encoding="utf-8").splitlines() if line.startswith("| ") and "---" not in line]
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2] for line in lines[1:]}
    assert rows == {(lay, fam) for lay, fam, _ in cells.CELLS}
    for lay, fam in rows:
        row = _matrix_row(lay, fam)
        for lib in cells.LIBRARIES:
            assert (row[lib] == "—") == ((lay, fam, lib) not in cells.CELLS), (lay, fam, lib)


def test_lycoris_get_diff_weight_matches_its_forward_pass(tmp_path):
    """lycoris-lora's plain-LoRA ``get_diff_weight`` (what the lycoris cell compares) is what its forward adds."""
    import lorafmt

    models = cells._models("sd1", te_text_model=True)
    path = tmp_path / "kohya.safetensors"
    lorafmt.convert(cells._original("sd1", "diffusers", models, tmp_path), path, to="kohya")  # an alpha on every module
    network = cells.lycoris_deltas(path, models)["__network__"]
    checked = 0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in network.unet_loras + network.text_encoder_loras:
            org = mod.org_module[0] if isinstance(mod.org_module, list) else mod.org_module
            if not isinstance(org, torch.nn.Linear):
                continue
            x = torch.randn(3, org.in_features, generator=g)
            added = (mod(x) - org(x)).numpy()
            diff = mod.get_diff_weight(1.0)[0].float().numpy()
            np.testing.assert_allclose(added, x.numpy() @ diff.T, rtol=1e-4, atol=1e-5, err_msg=mod.lora_name)
            checked += 1
    assert checked > 50


def test_lycoris_cannot_load_kohya_modules_without_alpha(tmp_path):
    """lycoris-lora 4.1.3 bug: a kohya module without an ``.alpha`` key (scale 1 in sd-scripts and in diffusers)
    makes ``create_network_from_weights`` raise (``float(None)`` in ``LoConModule.make_module_from_state_dict``).
    lorafmt's kohya output of a file that carries its alphas elsewhere writes every alpha, so it loads."""
    import lorafmt

    models = cells._models("sd1", te_text_model=True)
    lora = cells.random_lora("sd1", cells._shapes(models))
    assert any(m.alpha is None for m in lora.modules.values())
    path = tmp_path / "kohya.safetensors"
    lorafmt.write(lora, path, layout="kohya")
    with pytest.raises(TypeError, match="NoneType"):
        cells.lycoris_deltas(path, models)
