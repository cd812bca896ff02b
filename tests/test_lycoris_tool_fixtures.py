"""The lycoris-lora fixture files in ``fixtures/tools`` (written by ``lycoris.kohya.create_network`` +
``save_weights`` on a tiny SD1.5-structured U-Net and CLIP): for each file, lorafmt's patched weight equals the
live LyCORIS network's forward pass (rebuilt by ``fixtures.make_tool_fixtures.lycoris_network`` with its
parameters rounded to the saved fp16 values), within fp16 tolerance.

The reference is the module's forward pass, not ``get_diff_weight``: in lycoris-lora 4.1.3 LoHa/LoKr
``get_diff_weight`` applies alpha/rank twice (see test_lycoris_parity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")
tools = pytest.importorskip("fixtures.make_tool_fixtures")

from _lycoris_build import lycoris_effective  # noqa: E402

import lorafmt  # noqa: E402
from lorafmt.algorithms import get_algorithm  # noqa: E402

pytestmark = pytest.mark.parity

TOOLS = Path(__file__).resolve().parents[1] / "fixtures" / "tools"
FILES = sorted(p.stem for p in TOOLS.glob("lycoris_*.safetensors"))
EXPECTED = {
    "diag-oft": "oft", "dora": "lora", "full": "full", "ia3": "ia3", "locon-tucker": "lora", "locon": "lora",
    "loha-tucker": "loha", "loha": "loha", "lokr-fullmatrix": "lokr", "lokr-tucker": "lokr", "lokr": "lokr", "norm": "norm",
}


@pytest.mark.skipif(not FILES, reason="fixtures/tools not generated")
@pytest.mark.parametrize("name", FILES)
def test_tool_fixture_matches_lycoris(name):
    lora = lorafmt.read(TOOLS / f"{name}.safetensors")
    assert not lora.unplaced and not [d for d in lora.issues if d.severity == "error"]
    algo = EXPECTED[name.split("_")[1]]
    assert algo in lora.algorithms
    try:
        net, _unet, _te = tools.lycoris_network(name, round_to_saved=True)
    except KeyError:
        pytest.skip(f"no rebuild recipe for {name}")
    by_name = {next(iter(m.tensors.values())).key.split(".")[0]: m for m in lora.modules.values()}
    assert set(by_name) == {mod.lora_name for mod in net.loras}
    per_kind: dict = {}
    checked = 0
    for mod in net.loras:
        org = mod.org_module[0]
        if not isinstance(org, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        kind = (type(org).__name__, getattr(org, "kernel_size", None), mod.lora_name.startswith("lora_te"))
        per_kind[kind] = per_kind.get(kind, 0) + 1
        if per_kind[kind] > 2:  # two of each kind of layer keeps this fast
            continue
        weight = getattr(org, "weight", None)
        base = (weight if isinstance(weight, torch.Tensor) else mod.org_weight).detach().float().numpy()
        ref, _ = lycoris_effective(org, mod)
        m = by_name[mod.lora_name]
        got = get_algorithm(m.algorithm).apply(m, base)
        err = np.abs(got - ref.numpy()).max() / max(np.abs(ref.numpy() - base).max(), 1e-12)
        assert err < 2e-3, (mod.lora_name, err)
        checked += 1
    assert checked >= 2
