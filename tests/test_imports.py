"""Header-first commands stay light: they never import torch (or diffusers, transformers, peft), and the
header-only / rename-only paths do not even import numpy (SPEC "Performance budgets").

Each check runs the real CLI entry point in a fresh interpreter and looks at ``sys.modules`` afterwards, so an
import anywhere on the path (a layout, a registry, a plugin subcommand) is caught. No timing is asserted here;
``benchmarks/run.py`` measures time and memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafmt.io.safetensors_io import WriteEntry, write_safetensors

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors.torch")

_PROBE = r"""
import json, sys
from lorafmt.cli import main
rc = main(sys.argv[1:])
mods = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "safetensors", "pydantic"})
print("\n" + json.dumps({"rc": rc, "modules": mods}))
"""


def _f16(shape: tuple[int, ...], value: float = 0.01) -> bytes:
    import struct

    n = 1
    for d in shape:
        n *= d
    return struct.pack("<e", value) * n


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory) -> Path:
    """A small SD1 kohya LoRA: two attention modules and a text-encoder module, fp16, with alphas."""
    path = tmp_path_factory.mktemp("imports") / "kohya_sd1.safetensors"
    entries = []
    modules = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    }
    for name, (out_f, in_f) in modules.items():
        entries.append(WriteEntry(f"{name}.lora_down.weight", "F16", (4, in_f), data=_f16((4, in_f))))
        entries.append(WriteEntry(f"{name}.lora_up.weight", "F16", (out_f, 4), data=_f16((out_f, 4))))
        entries.append(WriteEntry(f"{name}.alpha", "F16", (), data=_f16((), 2.0)))
    write_safetensors(path, entries, {"ss_network_module": "networks.lora"})
    return path


def _run(*argv: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] in (0, 1), proc.stdout + proc.stderr
    return result


def _has_validate() -> bool:
    try:
        import lorafmt.cli_validate  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _commands(kohya: Path, out: Path) -> dict[str, list[str]]:
    diffusers = out / "diffusers.safetensors"
    cmds = {
        "inspect": ["inspect", str(kohya)],
        "inspect --json": ["inspect", "--json", str(kohya)],
        "convert kohya->diffusers": ["convert", str(kohya), "--to", "diffusers", "-o", str(diffusers)],
        "convert diffusers->kohya": ["convert", str(diffusers), "--to", "kohya", "-o", str(out / "kohya.safetensors")],
        "convert kohya->peft": ["convert", str(kohya), "--to", "peft", "-o", str(out / "peft")],
        "inspect peft folder": ["inspect", str(out / "peft")],
    }
    if _has_validate():
        cmds["validate (header only)"] = ["validate", str(kohya), "--family", "sd1"]
    return cmds


def test_header_first_commands_never_import_torch(kohya_file: Path, tmp_path: Path) -> None:
    for name, argv in _commands(kohya_file, tmp_path).items():
        loaded = _run(*argv)["modules"]
        heavy = [m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY[:5]]
        assert not heavy, f"`lorafmt {name}` imported {heavy}"


def test_header_only_and_rename_paths_do_not_import_numpy(kohya_file: Path, tmp_path: Path) -> None:
    # numpy costs ~0.1 s of start-up per process; alphas are decoded and encoded with struct, bytes are streamed.
    for name, argv in _commands(kohya_file, tmp_path).items():
        loaded = _run(*argv)["modules"]
        assert "numpy" not in loaded, f"`lorafmt {name}` imported numpy"


def test_rename_only_conversions_and_inspect_do_not_import_pydantic(kohya_file: Path, tmp_path: Path) -> None:
    # pydantic costs ~60 ms of start-up: the canonical records build without it (issue #8); only commands
    # that produce pydantic reports (validate, fuse) or JSON Schemas load it.
    for name, argv in _commands(kohya_file, tmp_path).items():
        if name.startswith("validate"):
            continue
        loaded = _run(*argv)["modules"]
        assert not [m for m in loaded if m.startswith("pydantic")], f"`lorafmt {name}` imported pydantic"


def test_detect_and_read_do_not_import_torch(kohya_file: Path) -> None:
    code = (
        "import json, sys, lorafmt\n"
        f"d = lorafmt.detect({str(kohya_file)!r}); lora = lorafmt.read({str(kohya_file)!r})\n"
        "assert d.layout == 'kohya' and len(lora.modules) == 3, (d, lora.modules)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'diffusers', 'transformers', 'peft', 'numpy'})))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_every_numpy_use_has_an_import_in_scope() -> None:
    """Modules import numpy lazily (inside the functions that compute); a use without an import in scope is a
    NameError waiting for the first caller. Static check over the package source."""
    import ast

    missing = []
    for path in sorted((REPO / "lorafmt").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(
            (isinstance(n, ast.Import) and any(a.asname == "np" for a in n.names))
            or (isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "np" for t in n.targets))
            for n in tree.body
        ):
            continue  # a module-level import (or lazy proxy `np = ...`) covers the whole module

        def imports_np(fn) -> bool:
            return any(isinstance(s, ast.Import) and any(a.asname == "np" for a in s.names) for s in ast.walk(fn))

        def visit(node, covered: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner = covered or imports_np(child)
                    uses = [s for stmt in child.body for s in ast.walk(stmt) if isinstance(s, ast.Name) and s.id == "np"]
                    if uses and not inner:
                        missing.append(f"{path.relative_to(REPO)}:{uses[0].lineno} ({child.name})")
                    visit(child, inner)
                elif isinstance(child, ast.ClassDef):
                    visit(child, covered)

        visit(tree, False)
    assert not missing, "np used without `import numpy as np` in scope: " + ", ".join(missing)
