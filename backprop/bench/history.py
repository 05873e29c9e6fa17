"""The run as groups of paired rounds, the machine it ran on, and the history of runs
(history.csv and its plot). The statistics are in backprop.bench.stats."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path

from backprop.bench.stats import OURS, TORCH, Group, ratio_flags


def groups(benchmarks: list[dict], memory: list[dict] | None = None) -> dict[tuple, Group]:
    """The groups of a pytest-benchmark run. A paired test (variant 'paired') gives a group's
    rounds; groups without one (the train step) fall back to each variant test's median."""
    peaks = {}
    for b in memory or []:
        i = b["extra_info"]
        peaks[(i["device"], i.get("mode", "step"), i["op"], i["shape"], i["variant"])] = i.get("peak_bytes")
    out: dict[tuple, Group] = {}
    for b in benchmarks:
        info = b["extra_info"]
        key = (info["device"], info.get("mode", "step"), info["op"], info["shape"])
        paired = info.get("paired")
        if paired:
            out[key] = Group(*key, times=paired["times"], paired=True, threads=paired.get("threads"),
                             load=tuple(paired["load"]) if paired.get("load") else None,
                             bytes=info.get("bytes"), flops=info.get("flops"),
                             peak=paired.get("peak_bytes"), sweep=bool(info.get("sweep")),
                             size=info.get("size"), sweep_top=bool(info.get("sweep_top")))
        elif key not in out or not out[key].paired:
            g = out.setdefault(key, Group(*key, times={}, paired=False, threads=info.get("threads"),
                                          bytes=info.get("bytes"), flops=info.get("flops"), peak={}))
            g.times[info["variant"]] = [b["stats"]["median"]]
            g.peak[info["variant"]] = info.get("peak_bytes")
    for (device, mode, op, shape), g in out.items():
        g.peak = dict(g.peak or {})
        for c in g.times:
            g.peak.setdefault(c, peaks.get((device, mode, op, shape, c)))
            if g.peak[c] is None:
                g.peak[c] = peaks.get((device, mode, op, shape, c))
    return out


def machine(run: dict) -> dict:
    """The run's machine: cpu, cores, torch, gpu, load at start and end, threads policy."""
    m = run.get("machine_info", {})
    extra = m.get("backprop", {})
    return {"cpu": m.get("cpu", {}).get("brand_raw") or m.get("processor") or "?",
            "cores": extra.get("cpus", "?"), "torch": extra.get("torch", "?"), "gpu": extra.get("gpu"),
            "load_start": extra.get("load_start"), "load_end": extra.get("load_end"),
            "busy_start": extra.get("busy_start"),
            "threads": extra.get("threads"), "commit": (run.get("commit_info") or {}).get("id")}


def busy_warning(run: dict) -> str | None:
    """A warning when the machine was loaded at the start or the end of the run, at or above half
    the cores: at the start the cores other processes kept busy (sampled from /proc/stat; the
    1-minute load average where the run has no sample: it still counts processes that just
    ended), at the end the 1-minute load average less the run's own threads."""
    m = machine(run)
    n = m["cores"] if isinstance(m["cores"], int) else None
    own = max((m["threads"] or {}).values(), default=1)  # the run itself, in the load at its end
    start = m["busy_start"] if m["busy_start"] is not None else m["load_start"]
    loads = [x for x in (start, None if m["load_end"] is None else m["load_end"] - own) if x is not None]
    if n and loads and max(loads) >= n / 2:
        sampled = ("" if m["busy_start"] is None
                   else f" (cores busy with others at the start: {m['busy_start']:.2f})")
        return (f"the machine was busy: 1-minute load {m['load_start']:.2f} at the start{sampled} and "
                f"{m['load_end']:.2f} at the end of the run, on {n} cores; other processes competed "
                "for the cores, so absolute times are inflated and rounds disagree more (the flagged "
                "ratios below are noise)")
    return None


# ---------------------------------------------------------------- history

HISTORY_FIELDS = ["run", "commit", "torch", "cpu", "threads", "load", "device", "op", "shape", "mode",
                  "contender", "p20", "p50", "p80", "baseline", "ratio", "ci_lo", "ci_hi", "flags"]


def git_commit(root: Path | None = None) -> str:
    root = root or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def history_rows(run: dict, commit: str | None = None) -> list[dict]:
    """One row per (group, contender): its p20/p50/p80 and its ratio against autograd (for
    torch's own paths: against our best; for the custom-op path: against the kernel, manual), with
    the interval and any flags."""
    m = machine(run)
    rows = []
    for g in groups(run["benchmarks"]).values():
        for c in g.times:
            baseline = ("autograd" if c in OURS else g.resolve("best") if c in TORCH
                        else "manual" if c == "custom-op" and "manual" in g.times else None)
            r = g.ratio(c, baseline) if baseline and baseline != c else None
            flags = ([] if r is None or math.isnan(r.lo) else ratio_flags(r)) + g.unstable(c)
            p20, p50, p80 = g.p(c)
            rows.append({
                "run": run.get("datetime", ""), "commit": commit or m["commit"] or git_commit(),
                "torch": m["torch"], "cpu": m["cpu"], "threads": g.threads, "load": m["load_start"],
                "device": g.device, "op": g.op, "shape": g.shape, "mode": g.mode, "contender": c,
                "p20": f"{p20:.6g}", "p50": f"{p50:.6g}", "p80": f"{p80:.6g}", "baseline": baseline or "",
                "ratio": "" if r is None else f"{r.median:.4g}",
                "ci_lo": "" if r is None or math.isnan(r.lo) else f"{r.lo:.4g}",
                "ci_hi": "" if r is None or math.isnan(r.hi) else f"{r.hi:.4g}", "flags": "; ".join(flags)})
    return rows


def append_history(times_json: Path, csv_path: Path, commit: str | None = None) -> int:
    """Append a run's rows to the history CSV (created with a header); a run already there (same
    pytest-benchmark datetime) is not added twice. Returns the number of rows added."""
    run = json.loads(Path(times_json).read_text())
    seen = set()
    if csv_path.exists():
        with csv_path.open(newline="") as f:
            seen = {row["run"] for row in csv.DictReader(f)}
    if run.get("datetime", "") in seen:
        return 0
    rows = history_rows(run, commit)
    new = not csv_path.exists()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def plot_history(csv_path: Path, op: str, png_path: Path, *, device: str = "cpu",
                 contenders: Sequence[str] = OURS) -> Path:
    """One op's ratio against autograd over the runs in the history, a line per (shape, mode,
    contender), the 95% interval shaded, the commits on the x axis in run order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Path(csv_path).open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["op"] == op and r["device"] == device
                and r["contender"] in contenders and r["ratio"]]
    if not rows:
        raise ValueError(f"no {device} rows for op {op!r} in {csv_path}")
    runs = sorted({(r["run"], r["commit"]) for r in rows})
    x_of = {run: i for i, run in enumerate(runs)}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(runs) + 3), 4.5))
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault((r["shape"], r["mode"], r["contender"]), []).append(r)
    for (shape, mode, contender), pts in sorted(lines.items()):
        pts.sort(key=lambda r: x_of[(r["run"], r["commit"])])
        xs = [x_of[(r["run"], r["commit"])] for r in pts]
        ax.plot(xs, [float(r["ratio"]) for r in pts], marker="o", label=f"{contender}, {shape}, {mode}")
        if all(r["ci_lo"] for r in pts):
            ax.fill_between(xs, [float(r["ci_lo"]) for r in pts], [float(r["ci_hi"]) for r in pts], alpha=0.15)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(runs)), [c for _, c in runs], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("autograd time / ours (log); > 1: ours faster")
    ax.set_title(f"{op} on {device}: speedup over autograd by commit (shaded: 95% CI)")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------- the backprop bench driver
