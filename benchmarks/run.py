"""lorafmt benchmark: whole-process time and peak memory of lorafmt, diffusers and `cp` on generated files.

    python benchmarks/run.py            # full run (< 10 min on 2 cores): writes benchmarks/RESULTS.md + scaling.png
    python benchmarks/run.py --quick    # fewer runs, no 2 GB point, no fuse (a couple of minutes)

Inputs are generated into ``benchmarks/out/`` (git-ignored, kept between runs): kohya sd-scripts LoRAs with the real
module sets of SD1.5 (rank 64, fp32, ~150 MB), SDXL (rank 16, fp16, ~115 MB; rank 128, ~900 MB), Flux.1 (rank 32,
bf16, ~300 MB), SDXL ranks 8..280 for the scaling chart (57 MB .. 2 GB), and fp16 diffusers U-Net files as fuse
bases. See ``gen.py``.

Method: every command is a fresh process (imports count), measured from spawn to exit; peak RSS is the child's
``ru_maxrss`` from ``wait4``. Before each run the previous output is deleted and ``sync`` is called, so no run pays
for another's writeback. Runs of the tools alternate (cp, lorafmt, diffusers, cp, lorafmt, ...); the table gives
medians. The page cache is warm (the inputs were just written or read): this measures the tools, not the disk.
lorafmt runs from this checkout (``PYTHONPATH``); diffusers jobs are in ``diffusers_jobs.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import gen  # noqa: E402

OUT = HERE / "out"
PY = sys.executable


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode compiled; so do we
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["HF_HUB_OFFLINE"] = "1"
    return env


ENV = child_env()


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class Sample:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    @property
    def time(self) -> float | None:
        return statistics.median(self.wall) if self.wall else None

    @property
    def cpu_time(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None

    @property
    def rss(self) -> float | None:
        return statistics.median(self.rss_mb) if self.rss_mb else None


def _clear(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _gnu_time() -> str | None:
    """GNU time, when present: it reports the child's own peak RSS (``%M``).

    ``wait4``'s ``ru_maxrss`` is not enough on its own: a child forked (or vforked) from this benchmark process
    inherits the parent's high-water mark until it execs, so a small command would show the benchmark's own memory.
    GNU time is a ~2 MB C program, so what it reports is the command's.
    """
    path = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if path is None:
        return None
    try:
        ok = subprocess.run([path, "-f", "%M", "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if ok.returncode == 0 and ok.stderr.strip().isdigit() else None


GNU_TIME = _gnu_time()
RSS_FILE = OUT / "tmp_rss.txt"


def run_once(argv: list[str], out: Path | None, sample: Sample) -> None:
    _clear(out)
    os.sync()
    time.sleep(0.2)
    if GNU_TIME:
        argv = [GNU_TIME, "-f", "%M %U %S", "-o", str(RSS_FILE), *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # validate exits 1 on findings
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {code}:\n{err[-3000:]}")
    sample.wall.append(wall)
    if GNU_TIME:
        rss_kb, user, system = RSS_FILE.read_text().split()[-3:]
        sample.rss_mb.append(int(rss_kb) / 1024)
    else:
        sample.rss_mb.append(usage.ru_maxrss / 1024)
    sample.cpu.append(usage.ru_utime + usage.ru_stime)  # the command's own CPU (user + system), exact from wait4


@dataclass
class Job:
    name: str
    src: Path
    lorafmt: list[str]
    out: Path | None = None
    diffusers: list[str] | None = None
    diffusers_out: Path | None = None
    diffusers_runs: int = 2
    cp: bool = True
    note: str = ""
    runs: int | None = None  # overrides the default (value checks read every byte: fewer runs)
    fsync: bool = False  # lorafmt --fsync, measured against `cp` + `sync FILE` (the same durability)
    results: dict[str, Sample] = field(default_factory=dict)


def measure(job: Job, runs: int) -> Job:
    runs = job.runs or runs
    cp_out = OUT / "tmp_cp.bin"
    variants: list[tuple[str, list[str], Path | None, int]] = []
    if job.cp and job.fsync:
        variants.append(("cp", ["sh", "-c", f'cp "{job.src}" "{cp_out}" && sync "{cp_out}"'], cp_out, runs))
    elif job.cp:
        variants.append(("cp", ["cp", str(job.src), str(cp_out)], cp_out, runs))
    flags = ["--fsync"] if job.fsync else []
    variants.append(("lorafmt", [PY, "-m", "lorafmt.cli", *flags, *job.lorafmt], job.out, runs))
    if job.diffusers:
        variants.append(("diffusers", [PY, str(HERE / "diffusers_jobs.py"), *job.diffusers], job.diffusers_out, job.diffusers_runs))
    job.results = {name: Sample() for name, *_ in variants}
    for i in range(max(v[3] for v in variants)):
        for name, argv, out, n in variants:
            if i < n:
                run_once(argv, out, job.results[name])
    for _, _, out, _ in variants:
        _clear(out)
    lf, cp, dif = job.results.get("lorafmt"), job.results.get("cp"), job.results.get("diffusers")
    line = f"  {job.name:44s} lorafmt {lf.time:7.3f}s (cpu {lf.cpu_time:6.3f}s) {lf.rss:6.0f}MB"
    if cp:
        line += f" | cp {cp.time:6.3f}s (x{lf.time / cp.time:5.1f})"
    if dif:
        line += f" | diffusers {dif.time:7.2f}s (cpu {dif.cpu_time:6.2f}s) {dif.rss:6.0f}MB (lorafmt {dif.time / lf.time:5.1f}x faster)"
    print(line, flush=True)
    return job


# --------------------------------------------------------------------------------------------- inputs


def have_cli(name: str) -> bool:
    try:
        __import__(f"lorafmt.cli_{name}")
    except ModuleNotFoundError:
        return False
    return True


def have_flux() -> bool:
    try:
        from lorafmt.layouts import get_layout

        return "flux1" in get_layout("kohya").capabilities.families
    except Exception:  # noqa: BLE001 - an older checkout: no Flux
        return False


def ensure(path: Path, make) -> Path:
    stamp = path.with_suffix(path.suffix + ".ok")
    if not (path.exists() and stamp.exists() and stamp.read_text() == gen.GEN_VERSION):
        t = time.perf_counter()
        make(str(path))
        stamp.write_text(gen.GEN_VERSION)
        print(f"  generated {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f}s", flush=True)
    return path


def lorafmt_convert(src: Path, dst: Path, to: str) -> Path:
    stamp = dst.with_suffix(dst.suffix + ".ok")
    version = f"{gen.GEN_VERSION} {src.stat().st_mtime_ns}"  # redone when its source was regenerated
    if not (dst.exists() and stamp.exists() and stamp.read_text() == version):
        subprocess.run([PY, "-m", "lorafmt.cli", "convert", str(src), "--to", to, "-o", str(dst), "--force"], env=ENV, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        stamp.write_text(version)
    return dst


def _stat(sample: Sample) -> dict:
    return {"time": sample.time, "cpu": sample.cpu_time, "rss": sample.rss}


SCALING_RANKS = (8, 32, 64, 128, 280)  # SDXL kohya fp16: 57 MB, 228 MB, 456 MB, 912 MB, 1995 MB


# --------------------------------------------------------------------------------------------- report


def mb(path: Path) -> str:
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{size / 1e6:.0f} MB"


def machine() -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GB"
    except OSError:
        pass
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(OUT)], capture_output=True, text=True).stdout.strip()
    from importlib.metadata import version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except Exception:  # noqa: BLE001
            return "-"

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; RAM {mem}; no GPU; filesystem {fs} ({platform.system()} {platform.release()})",
        f"- Python {platform.python_version()}; torch {v('torch')}, diffusers {v('diffusers')}, peft {v('peft')}, "
        f"transformers {v('transformers')}, safetensors {v('safetensors')}, pydantic {v('pydantic')}, numpy {v('numpy')}",
        f"- lorafmt at commit {commit or '?'}",
    ]


def fmt_t(x: float | None) -> str:
    return "—" if x is None else (f"{x:.2f} s" if x < 10 else f"{x:.1f} s")


def fmt_m(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f} MB"


def table(jobs: list[Job]) -> list[str]:
    rows = [
        "| job | input | `cp` | lorafmt | lorafmt CPU | lorafmt peak RSS | diffusers | diffusers CPU "
        "| diffusers peak RSS | lorafmt ÷ `cp` | diffusers ÷ lorafmt (CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for j in jobs:
        r = j.results
        lf, cp, dif = r.get("lorafmt"), r.get("cp"), r.get("diffusers")
        if lf is None:
            rows.append(f"| {j.name} | {j.src.name} | | {j.note or 'pending'} | | | | | | | |")
            continue
        ratio = f"{lf.time / cp.time:.1f}×" if cp else "—"
        ratio_cp = f"**{ratio}**" if cp and j.name.startswith("convert") else ratio  # the budgeted ratio
        ratio_d = f"**{dif.time / lf.time:.0f}×** ({dif.cpu_time / lf.cpu_time:.0f}×)" if dif else "—"
        cp_cell = (fmt_t(cp.time) + (" (+sync)" if j.fsync else "")) if cp else "—"
        rows.append(
            f"| {j.name} | {j.src.name} ({mb(j.src)}) | {cp_cell} "
            f"| {fmt_t(lf.time)} | {fmt_t(lf.cpu_time)} | {fmt_m(lf.rss)} | {fmt_t(dif.time if dif else None)} "
            f"| {fmt_t(dif.cpu_time if dif else None)} | {fmt_m(dif.rss if dif else None)} | {ratio_cp} | {ratio_d} |"
        )
    return rows


def chart(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
    series = [
        ("cp", "cp", "k", ":"),
        ("lorafmt convert", "lorafmt convert kohya→diffusers", "C0", "-"),
        ("lorafmt validate", "lorafmt validate (header only)", "C2", "-"),
        ("lorafmt validate --check-values", "lorafmt validate --check-values", "C2", "--"),
        ("diffusers convert", "diffusers lora_state_dict + save_lora_weights", "C3", "-"),
    ]
    for key, label, color, style in series:
        pts = [(p["mb"], p[key]) for p in points if p.get(key)]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        ax_t.plot(xs, [s["time"] for _, s in pts], style, color=color, marker="o", label=label)
        if key != "cp":
            ax_m.plot(xs, [s["rss"] for _, s in pts], style, color=color, marker="o", label=label)
    for ax, title, unit in ((ax_t, "whole-process time", "seconds"), (ax_m, "peak RSS", "MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("LoRA file size (MB, SDXL kohya fp16, ranks 8–280)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle("lorafmt vs diffusers vs cp: scaling with file size (2 cores, warm page cache)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(jobs: list[Job], points: list[dict], notes: list[str], elapsed: float, load: tuple) -> str:
    lines = [
        "# lorafmt benchmark results",
        "",
        f"Generated by `python benchmarks/run.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"in {elapsed / 60:.1f} minutes. Machine:",
        "",
        *machine(),
        f"- shared machine: load average {load[0]:.1f} at start, {load[1]:.1f} at the end (other jobs were running; "
        "medians damp but do not remove that noise)",
        "",
        "Whole process, from spawn to exit (imports included), median wall time of the runs; CPU is the "
        "process's user + system time (median), which the machine's load disturbs far less than wall time; peak "
        "RSS is the process's high-water mark. Ratios: lorafmt ÷ `cp` of the same file (the budget is ≤ 3×) and "
        "diffusers ÷ lorafmt (how many times faster lorafmt is, by wall time and, in brackets, by CPU time; the budget "
        "is ≥ 10×). The `--fsync` row flushes its output to disk, like `cp` followed by `sync FILE` in its `cp` column.",
        "",
        *table(jobs),
        "",
    ]
    if points:
        lines += [
            "## Scaling with file size",
            "",
            "![scaling](scaling.png)",
            "",
            "| file | `cp` | lorafmt convert | peak RSS | lorafmt validate | peak RSS | validate --check-values | peak RSS | diffusers convert | peak RSS |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in points:
            def cell(key: str) -> str:
                s = p.get(key)
                return f"{fmt_t(s['time'])} | {fmt_m(s['rss'])}" if s else "— | —"

            cp = p.get("cp")
            lines.append(
                f"| {p['mb']:.0f} MB (rank {p['rank']}) | {fmt_t(cp['time']) if cp else '—'} | {cell('lorafmt convert')} "
                f"| {cell('lorafmt validate')} | {cell('lorafmt validate --check-values')} | {cell('diffusers convert')} |"
            )
        lines.append("")
    lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    text = "\n".join(lines)
    (HERE / "RESULTS.md").write_text(text)
    return text


def update_readme(table_lines: list[str]) -> bool:
    """Replace the block between the benchmark markers in README.md, if README has them."""
    readme = ROOT / "README.md"
    start, end = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
    if not readme.exists():
        return False
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    block = "\n".join(["", *table_lines, "", "Machine, method and the scaling chart: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).", ""])
    readme.write_text(head + start + block + end + tail)
    return True


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 runs each, 1 diffusers run, no 2 GB point, no fuse")
    ap.add_argument("--runs", type=int, default=None, help="runs per lorafmt/cp measurement (default 5; quick 2)")
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers side")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--fuse-sdxl", action="store_true", help="also fuse into an SDXL U-Net (5.1 GB base; several minutes)")
    args = ap.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    drun = 1 if args.quick else 2
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    OUT.mkdir(exist_ok=True)
    notes: list[str] = []

    validate, fuse, flux = have_cli("validate"), have_cli("fuse") and not args.no_fuse and not args.quick, have_flux()
    print(f"lorafmt features: validate={validate} fuse={have_cli('fuse')} flux={flux}", flush=True)

    print("generating inputs (cached in benchmarks/out/)", flush=True)
    sd15 = ensure(OUT / "sd15_kohya_r64.safetensors", lambda p: gen.make_kohya(p, "sd1", 64, dtype="F32"))
    sdxl16 = ensure(OUT / "sdxl_kohya_r16.safetensors", lambda p: gen.make_kohya(p, "sdxl", 16))
    sdxl128 = ensure(OUT / "sdxl_kohya_r128.safetensors", lambda p: gen.make_kohya(p, "sdxl", 128))
    sdxl16_d = lorafmt_convert(sdxl16, OUT / "sdxl_diffusers_r16.safetensors", "diffusers")
    flux32 = ensure(OUT / "flux_kohya_r32.safetensors", lambda p: gen.make_kohya(p, "flux1", 32)) if flux else OUT / "flux_kohya_r32.safetensors"

    # Warm-up (untimed): compiles lorafmt's bytecode and pulls torch/diffusers into the page cache.
    subprocess.run([PY, "-m", "lorafmt.cli", "inspect", str(sdxl16)], env=ENV, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if not args.no_diffusers:
        subprocess.run([PY, "-c", "import torch, diffusers, peft, safetensors.torch; from diffusers import StableDiffusionXLPipeline"], env=ENV, cwd=ROOT, check=True, stderr=subprocess.DEVNULL)

    def d(argv: list[str]) -> list[str] | None:
        return None if args.no_diffusers else argv

    o = OUT
    jobs: list[Job] = [
        Job("inspect (header only)", sdxl16, ["inspect", str(sdxl16)]),
        Job("inspect --json (header only)", sdxl128, ["inspect", "--json", str(sdxl128)]),
    ]
    if validate:
        jobs += [
            Job("validate --family sdxl (header only)", sdxl16, ["validate", str(sdxl16), "--family", "sdxl"]),
            Job("validate --family sdxl (header only)", sdxl128, ["validate", str(sdxl128), "--family", "sdxl"]),
            Job("validate --check-values", sdxl16, ["validate", str(sdxl16), "--family", "sdxl", "--check-values"], runs=min(runs, 3)),
            Job("validate --check-values", sdxl128, ["validate", str(sdxl128), "--family", "sdxl", "--check-values"], runs=1),
        ]
    else:
        jobs.append(Job("validate", sdxl16, [], note="(pending: lands from branch `arch`)"))
    jobs += [
        Job("convert kohya→diffusers", sd15, ["convert", str(sd15), "--to", "diffusers", "-o", str(o / "t.safetensors")], o / "t.safetensors",
            d(["kohya-to-diffusers", str(sd15), str(o / "t_d"), "--family", "sd1"]), o / "t_d", drun),
        Job("convert kohya→diffusers", sdxl16, ["convert", str(sdxl16), "--to", "diffusers", "-o", str(o / "t.safetensors")], o / "t.safetensors",
            d(["kohya-to-diffusers", str(sdxl16), str(o / "t_d"), "--family", "sdxl"]), o / "t_d", drun),
        Job("convert kohya→diffusers --fsync", sdxl16, ["convert", str(sdxl16), "--to", "diffusers", "-o", str(o / "t.safetensors")],
            o / "t.safetensors", fsync=True),
        Job("convert kohya→diffusers", sdxl128, ["convert", str(sdxl128), "--to", "diffusers", "-o", str(o / "t.safetensors")], o / "t.safetensors",
            d(["kohya-to-diffusers", str(sdxl128), str(o / "t_d"), "--family", "sdxl"]), o / "t_d", 1),
        Job("convert diffusers→kohya", sdxl16_d, ["convert", str(sdxl16_d), "--to", "kohya", "-o", str(o / "t.safetensors")], o / "t.safetensors",
            d(["diffusers-to-kohya", str(sdxl16_d), str(o / "t_d.safetensors")]), o / "t_d.safetensors", drun),
        Job("convert kohya→peft (folder)", sd15, ["convert", str(sd15), "--to", "peft", "-o", str(o / "t_peft")], o / "t_peft",
            d(["kohya-to-peft", str(sd15), str(o / "t_d"), "--family", "sd1"]), o / "t_d", drun),
    ]
    if flux:
        jobs.append(Job("convert Flux kohya→diffusers (split qkv)", flux32, ["convert", str(flux32), "--to", "diffusers", "-o", str(o / "t.safetensors")],
                        o / "t.safetensors", d(["flux-kohya-to-diffusers", str(flux32), str(o / "t_d")]), o / "t_d", drun))
    else:
        jobs.append(Job("convert Flux kohya→diffusers (split qkv)", flux32, [], note="(pending: Flux layouts land from branch `flux`)"))
    if fuse:
        targets = [("sd1", 64, "F16")] + ([("sdxl", 16, "F16")] if args.fuse_sdxl else [])
        for fam, rank, dtype in targets:
            base = ensure(o / f"{fam}_unet_base_fp16.safetensors", lambda p, fam=fam: gen.make_unet_base(p, fam))
            lora = ensure(o / f"{fam}_kohya_unet_r{rank}.safetensors", lambda p, fam=fam, rank=rank, dtype=dtype: gen.make_kohya(p, fam, rank, text_encoders=False, dtype=dtype))
            jobs.append(Job(f"fuse U-Net-only rank-{rank} LoRA into {fam} U-Net", base, ["fuse", str(base), "--lora", str(lora), "-o", str(o / "t.safetensors")],
                            o / "t.safetensors", d(["fuse", str(base), str(lora), str(o / "t_d.safetensors"), "--family", fam]), o / "t_d.safetensors", 1,
                            runs=min(runs, 2)))
        if not args.fuse_sdxl:
            jobs.append(Job("fuse into SDXL U-Net", OUT / "sdxl_unet_base_fp16.safetensors", [],
                            note="(not in the default run: 5.1 GB base; `--fuse-sdxl` adds it)"))
    else:
        why = "lands from branch `fuse`" if not have_cli("fuse") else "skipped (--quick / --no-fuse)"
        jobs.append(Job("fuse into SD1.5 / SDXL U-Net", OUT / "sdxl_unet_base_fp16.safetensors", [], note=f"(pending: {why})"))

    print(f"measuring ({runs} runs each, diffusers {drun})", flush=True)
    for j in jobs:
        if j.lorafmt:
            measure(j, runs)

    points: list[dict] = []
    if not args.no_scaling:
        print("scaling", flush=True)
        ranks = SCALING_RANKS if not args.quick else SCALING_RANKS[:-1]
        for rank in ranks:
            src = ensure(OUT / f"sdxl_kohya_r{rank}.safetensors", lambda p, rank=rank: gen.make_kohya(p, "sdxl", rank))
            p: dict = {"rank": rank, "mb": src.stat().st_size / 1e6}
            tmp = Job("", src, ["convert", str(src), "--to", "diffusers", "-o", str(o / "t.safetensors")], o / "t.safetensors",
                      d(["kohya-to-diffusers", str(src), str(o / "t_d"), "--family", "sdxl"]) if rank <= 128 else None, o / "t_d", 1)
            tmp.name = f"scaling {p['mb']:.0f} MB convert"
            measure(tmp, max(2, runs - 2))
            p["cp"] = _stat(tmp.results["cp"])
            p["lorafmt convert"] = _stat(tmp.results["lorafmt"])
            if "diffusers" in tmp.results:
                p["diffusers convert"] = _stat(tmp.results["diffusers"])
            if validate:
                for key, extra in (("lorafmt validate", []), ("lorafmt validate --check-values", ["--check-values"])):
                    if extra and p["mb"] > 1500:
                        continue  # ~35 s of CPU at 2 GB: left out to keep the run short (see the notes)
                    v = Job(f"scaling {p['mb']:.0f} MB {key}", src, ["validate", str(src), "--family", "sdxl", *extra], cp=False,
                            runs=1 if extra else max(2, runs - 2))
                    measure(v, runs)
                    p[key] = _stat(v.results["lorafmt"])
            points.append(p)
        chart(points, HERE / "scaling.png")
        notes.append("Scaling: diffusers is measured up to 913 MB (one run per point); at 2 GB only lorafmt convert, header-only "
                     "validate and `cp` run, and `--check-values` stops at 913 MB, to keep the whole benchmark short.")

    notes += [
        "Inputs are synthetic but structurally real: the module sets sd-scripts trains (U-Net `Transformer2DModel` "
        "Linear/1×1-conv layers; CLIP attention + MLP; Flux double/single blocks), shapes from diffusers' "
        "`UNet2DConditionModel` built with the published SD1.5/SDXL configs on the meta device, SGM block names for "
        "SDXL, random normal values. SD1.5 is fp32 (as older sd-scripts files are), SDXL fp16, Flux bf16.",
        "diffusers reference jobs (`benchmarks/diffusers_jobs.py`): kohya→diffusers = `lora_state_dict(path, unet_config=...)` "
        "+ `convert_*_state_dict_to_peft` + `save_lora_weights` (diffusers' own converter and writer); diffusers→kohya = "
        "`convert_state_dict_to_kohya` (which keeps diffusers block names and writes alpha = rank, so it does less than "
        "lorafmt); kohya→peft = diffusers' converter + `LoraConfig.save_pretrained` + the adapter file per component; "
        "fuse = U-Net built on meta with the base weights assigned, `load_lora_adapter` → `fuse_lora` → `unload_lora` → save.",
        "Peak RSS: " + ("GNU time `%M` of each command." if GNU_TIME else "`wait4` `ru_maxrss` (GNU time not found: small "
        "commands then show part of the benchmark process's own memory, inherited until exec)."),
        "`inspect` and `validate` have no diffusers counterpart (diffusers has no header-only reader or validator).",
        "Durability: every lorafmt output is written to a temporary file and renamed into place (never half-written, "
        "whatever kills the process). Replacing an existing file also flushes the new one to disk first, so a power "
        "loss cannot cost the old file; a new output is flushed only with `--fsync` (`LORAFMT_FSYNC=always`), as "
        "`cp` and diffusers' `save_file` do not flush either. The `--fsync` row is measured against `cp` + `sync`.",
        "Fuse: lorafmt streams the base file tensor by tensor (peak memory about the largest tensor plus the LoRA); "
        "diffusers holds the whole U-Net plus the adapter. Both fused outputs agree to fp16 rounding.",
        "This machine is shared with other jobs (see the load average above), so wall times carry their queueing; the "
        "CPU columns are the cost of the work itself and are what an idle 2-core machine would roughly show as wall "
        "time for the single-threaded lorafmt commands (plus the fsync wait).",
        "lorafmt's rename-only conversions stream tensor bytes without decoding them (1 MiB windows of the source read "
        "with one `preadv` and written with one `writev`, in source order; tensors over 1 MiB with `copy_file_range`) "
        "and import neither torch, numpy nor pydantic. Its floor is the interpreter and the standard-library imports "
        "(about 40 ms); the rest is about 10 µs of Python per tensor and copying the bytes, as `cp` does.",
        "Kohya inputs carry sd-scripts' `sshs_model_hash`/`sshs_legacy_hash`. Converting to kohya recomputes them in "
        "the writing pass (one sha256 over the tensor bytes); other layouts drop them rather than keep stale values.",
    ]
    elapsed = time.perf_counter() - t_start
    write_report(jobs, points, notes, elapsed, (load0, os.getloadavg()[0]))
    if update_readme(table(jobs)):
        print("updated the benchmark table in README.md")
    (OUT / "results.json").write_text(json.dumps(
        {j.name + " | " + j.src.name: {k: {"wall": s.wall, "rss_mb": s.rss_mb} for k, s in j.results.items()} for j in jobs}, indent=1))
    print("\n".join(table(jobs)))
    print(f"\nwrote {HERE / 'RESULTS.md'}" + (f" and {HERE / 'scaling.png'}" if points else "") + f" in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
