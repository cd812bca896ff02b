"""Helpers the batch tests send to worker processes (importable by name, so pools and clusters can run them)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

from lorafmt.batch import Task, run_task


def crash_once(task: Task, *, marker: str, victim: str) -> dict:
    """Run the task, then — the first time `victim` is processed anywhere — kill this worker process with
    SIGKILL before the result is returned (the output is already written: the retry must cope with it)."""
    rec = run_task(task)
    if task.path.endswith(victim):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return rec
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    return rec


def make_collection(root: Path, n: int, *, broken: int = 1, peft: int = 1, seed: int = 0) -> list[Path]:
    """`n` small kohya SD1 LoRAs in nested folders, `broken` unusable files, `peft` PEFT folders."""
    import lorafmt
    from lorafmt.testing import make_lora

    root.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        sub = root / f"group{i % 3}"
        sub.mkdir(exist_ok=True)
        lora = make_lora("sd1", modules=3, rank=2, alpha=float(1 + i % 4), seed=seed + i, dtype="F16",
                         metadata={"ss_network_dim": "2", "ss_output_name": f"lora{i}"})
        path = sub / f"lora{i:04d}.safetensors"
        lorafmt.write(lora, path, layout="kohya")
        made.append(path)
    for j in range(broken):
        path = root / f"broken{j}.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(np.arange(32, dtype=np.uint8)))
        made.append(path)
    for k in range(peft):
        lora = make_lora("sd1", modules=3, rank=2, alpha=2.0, seed=1000 + k)
        path = root / f"peft{k}"
        lorafmt.write(lora, path, layout="peft")
        made.append(path)
    return made
