"""Turn a pytest-benchmark JSON run into the report people read, compare two runs, or plot an op's
history.

    python benchmarks/report.py times.json [more.json ...] [--memory memory.json] --out DIR
    python benchmarks/report.py compare OLD.json NEW.json [--threshold 1.25]
    python benchmarks/report.py compare --latest .benchmarks [--threshold 1.25]
    python benchmarks/report.py history DIR/history.csv OP [--out OP.png]

The report (DIR/report.md, speedups.png, sweep.png; a row per group and contender appended to
DIR/history.csv) takes every ratio from paired rounds (backprop/bench.py): the median over rounds
of (baseline time / contender time), with a bootstrap 95% interval; above 1, ours is faster. The
headline is our best path (the fastest of manual, manual-compiled and manual-cpp) against torch's fastest
(autograd, autograd-compiled or native). A ratio beyond 50x either way, or with an interval wider
than 2x, is listed under "Flagged" instead of in a table; a contender whose rounds disagree
(p80/p20 > 1.5) is warned about next to the ratio. "% copy" is the copy's time over ours (both
move the op's minimal bytes); linear, compute-bound, gets TFLOP/s instead. "custom-op vs kernel" is
manual's time over custom-op's (torch.ops.backprop.<op> under autograd): below 1 by the custom-op
path's cost; its target is at most 10% over the kernel (>= 1/1.1) at the large shapes.

compare: for each of our contenders in each group found in both runs, the change of its ratio
against autograd from OLD to NEW (a slowdown above 1), with a bootstrap interval that resamples
each run's rounds. Against autograd, because torch's own time in the same rounds cancels what the
machine did during each run. Exit 1 only when an interval lies wholly above the threshold.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from backprop import bench  # noqa: E402
from backprop.bench import Group, Ratio  # noqa: E402
from backprop.testing.opinfo import OP_DB  # noqa: E402

COMPILED_MODELS = ("custom-op-compiled", "functional-compiled")  # the train step's drop-in pair
CUSTOM_OP_BAR = 1 / 1.1  # manual / custom-op: the custom-op path at most 10% slower than the kernel
CONTENDERS = ["manual", "manual-compiled", "manual-cpp", "custom-op", "adapter", "autograd",
              "autograd-compiled", "native", "liger", "copy", "notebook", "custom-op-compiled",
              "functional-compiled"]

# (op, shape regex, mode, contender, baseline, threshold, what): the speed issues' targets, from
# the op table (each op's own, and opinfo.FASTEST for every op: best >= 1x torch fastest at the
# large shapes and the notebook's scale), then the step's. "best" is the fastest of manual,
# manual-compiled and manual-cpp: the best public path; "torch" the fastest of autograd, autograd-compiled and
# native in the same rounds; "copy" a copy of the op's minimal bytes.
TARGETS = [
    *((info.name, *target) for info in OP_DB for target in info.speed_targets),
    # issue 15: the path a user takes through torch.ops.backprop.<op> against the kernel itself
    *((info.name, "large", "fwd+bwd", "custom-op", "manual", CUSTOM_OP_BAR,
       "custom-op path <= 10% over the kernel") for info in OP_DB),
    ("train_step", "batch=32$", "step", "manual", "autograd", 2.5, "eager manual step >= 2.5x autograd"),
    ("train_step", "batch=32$", "step", "manual-compiled", "autograd", 5.0,
     "compiled manual step >= 5x autograd"),
    # issue 15 asks for the measurement, not a bar: 1x marks which model is faster
    ("train_step", "compiled models", "step", "custom-op-compiled", "functional-compiled", 1.0,
     "compiled model: torch.ops.backprop vs torch functionals (no bar; 1x = parity)"),
]

# (op, shape regex, mode, contender, baseline, at most, what): the contender's extra peak memory over the
# baseline's (the memory pass, BACKPROP_BENCH=memory), from the op table's memory_targets
MEMORY_TARGETS = [(info.name, *target) for info in OP_DB for target in info.memory_targets]

Groups = dict[tuple, Group]


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["benchmarks"]


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_ratio(r: Ratio | None) -> str:
    if r is None:
        return "—"
    if math.isnan(r.lo):
        return f"{r.median:.2f}x (no CI: unpaired)"
    return f"{r.median:.2f}x [{r.lo:.2f}, {r.hi:.2f}]"


def headline(g: Group, contender: str, baseline: str) -> tuple[str, list[str]]:
    """The cell for a ratio, and the reasons it is flagged (then the cell does not show it)."""
    r = g.ratio(contender, baseline)
    flags = [] if r is None or math.isnan(r.lo) else bench.ratio_flags(r)
    return ("flagged†" if flags else fmt_ratio(r)), flags


def throughput(g: Group, contender: str) -> str:
    """% of copy bandwidth (memory-bound ops) or TFLOP/s (compute-bound), for one contender."""
    c = g.resolve(contender)
    if c is None:
        return "—"
    if g.flops:
        return f"{g.flops / g.p(c)[1] / 1e12:.3g} TFLOP/s"
    r = g.ratio(contender, "copy")
    return "—" if r is None else f"{100 * r.median:.0f}%"


def header(run: dict, gs: Groups) -> list[str]:
    m = bench.machine(run)
    threads = m["threads"] or {}
    used = sorted({g.threads for g in gs.values() if g.threads is not None})
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}"
             + (f", GPU {m['gpu']}" if m["gpu"] else "")
             + (f", commit {m['commit'][:10]}" if m["commit"] else ""),
             f"Threads: {threads.get('small', '?')} at notebook scale, {threads.get('large', '?')} above it "
             f"(torch.set_num_threads; BACKPROP_BENCH_THREADS overrides); used: {', '.join(map(str, used))}",
             "Load (1-minute average): " + ", ".join(
                 f"{k} {m[f'load_{k}']:.2f}" for k in ("start", "end") if m[f"load_{k}"] is not None)
             + ("" if m["busy_start"] is None else
                f"; cores busy with other processes at the start (/proc/stat, 0.5 s): {m['busy_start']:.2f}"),
             ""]
    warning = bench.busy_warning(run)
    if warning:
        lines += [f"> **Warning:** {warning}.", ""]
    if any(t > 1 for t in used) and warning:
        lines += ["> **Warning:** more than one thread on a busy machine: every parallel region waits "
                  "for a descheduled thread; rerun with BACKPROP_BENCH_THREADS=1.", ""]
    lines += ["Ratios: median over paired rounds of (baseline time / contender time), [bootstrap 95% CI]; "
              "above 1, the first-named is faster. †: flagged, see below. ⚠: rounds disagree "
              f"(p80/p20 > {bench.UNSTABLE_SPREAD}).", ""]
    return lines


def tables(gs: Groups) -> tuple[list[str], list[str]]:
    """The headline and detail tables per (device, mode), and the flagged list."""
    lines, flagged = [], []
    by_section: dict[tuple[str, str], list[Group]] = {}
    for g in gs.values():
        if not g.sweep:
            by_section.setdefault((g.device, g.mode), []).append(g)
    for (device, mode), section in sorted(by_section.items()):
        section.sort(key=lambda g: (g.op, g.shape))
        torch_side = "torch fastest" if mode != "step" else "autograd"
        lines += [f"### {device}, {mode}", "",
                  f"| op | shape | ours best | {torch_side} | **speedup** ({torch_side} / ours best) "
                  "| manual vs autograd | custom-op vs kernel (manual / custom-op) "
                  "| % copy or TFLOP/s (ours best) | notes |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for g in section:
            # the compiled-models step group (bench_train_step): our ops' model against torch's
            pair = (COMPILED_MODELS if set(g.times) == set(COMPILED_MODELS)
                    else ("best", "torch" if mode != "step" else "autograd"))
            ours, theirs = g.resolve(pair[0]), g.resolve(pair[1])
            top, top_flags = headline(g, *pair)
            eager, eager_flags = headline(g, "manual", "autograd")
            custom, custom_flags = headline(g, "custom-op", "manual")
            notes = g.unstable(*pair, "manual", "autograd", "custom-op")
            for what, flags, r in (("speedup", top_flags, g.ratio(*pair)),
                                   ("manual vs autograd", eager_flags, g.ratio("manual", "autograd")),
                                   ("custom-op vs kernel", custom_flags, g.ratio("custom-op", "manual"))):
                if flags:
                    flagged.append(f"- {g.op} {g.shape} ({device}, {mode}), {what}: {fmt_ratio(r)}: "
                                   + "; ".join(flags + notes))
            ours_cell = f"{ours} {fmt_time(g.p(ours)[1])}" if ours else "—"
            theirs_cell = f"{theirs} {fmt_time(g.p(theirs)[1])}" if theirs else "—"
            lines.append(f"| {g.op} | {g.shape} | {ours_cell} | {theirs_cell} | {top} | {eager} | {custom} | "
                         f"{throughput(g, 'best')} | {'⚠ ' + '; '.join(notes) if notes else ''} |")
        variants = [v for v in CONTENDERS if any(v in g.times for g in section)]
        lines += ["", f"Every contender ({device}, {mode}): median time per call (p80/p20 over rounds); "
                  "peak MiB above what existed before the call.", "",
                  "| op | shape | threads | rounds | " + " | ".join(variants) + " | peak MiB ("
                  + ", ".join(v for v in variants if v != "copy") + ") |",
                  "|---|---|---:|---:|" + "---:|" * (len(variants) + 1)]
        for g in section:
            rounds = len(next(iter(g.times.values()))) if g.paired else "—"
            cells = [(f"{fmt_time(g.p(v)[1])} ({bench.spread(g.times[v]):.2f})" if g.paired
                      else fmt_time(g.p(v)[1])) if v in g.times else "—" for v in variants]
            peaks = [f"{g.peak[v] / 2**20:.3g}" if g.peak and g.peak.get(v) is not None else "—"
                     for v in variants if v != "copy"]
            lines.append(f"| {g.op} | {g.shape} | {g.threads or '?'} | {rounds} | " + " | ".join(cells)
                         + " | " + " / ".join(peaks) + " |")
        lines.append("")
    return lines, flagged


def targets(gs: Groups, device: str = "cpu") -> str:
    lines = ["| target | op | shape | measured [95% CI] | met |", "|---|---|---|---:|---|"]
    for op, pattern, mode, contender, baseline, threshold, what in TARGETS:
        for g in sorted((g for g in gs.values() if g.device == device and g.mode == mode and not g.sweep),
                        key=lambda g: g.shape):
            if g.op != op or not re.search(pattern, g.shape):
                continue
            r = g.ratio(contender, baseline)
            flags = [] if r is None or math.isnan(r.lo) else bench.ratio_flags(r)
            if r is None:
                met, shown = "—", "—"
            elif flags:
                met, shown = "flagged†", "flagged†"
            else:
                met = verdict(r, threshold)
                shown = (f"{100 * r.median:.0f}% of copy [{100 * r.lo:.0f}%, {100 * r.hi:.0f}%]"
                         if baseline == "copy" else fmt_ratio(r))
            lines.append(f"| {what} | {op} | {g.shape} | {shown} | {met} |")
    return "\n".join(lines)


def memory_targets(gs: Groups, device: str = "cpu") -> str:
    """The memory targets: peak(contender) / peak(baseline), met when at most the threshold; "—"
    without a memory pass (or a contender it did not measure)."""
    lines = ["| target | op | shape | extra peak MiB (contender / baseline) | ratio | met |",
             "|---|---|---|---:|---:|---|"]
    for op, pattern, mode, contender, baseline, threshold, what in MEMORY_TARGETS:
        for g in sorted((g for g in gs.values() if (g.device, g.mode, g.op) == (device, mode, op)
                         and not g.sweep and re.search(pattern, g.shape)), key=lambda g: g.shape):
            ours, theirs = (g.peak or {}).get(contender), (g.peak or {}).get(baseline)
            if ours is None or not theirs:
                lines.append(f"| {what} | {op} | {g.shape} | — | — | — |")
                continue
            ratio = ours / theirs
            lines.append(f"| {what} | {op} | {g.shape} | {ours / 2**20:.4g} / {theirs / 2**20:.4g} | "
                         f"{ratio:.3f} | {'yes' if ratio <= threshold else '**no**'} (at most {threshold:g}) |")
    return "\n".join(lines)


def verdict(r: Ratio, threshold: float) -> str:
    """yes: the interval lies above the threshold; no: below it; unclear: it straddles."""
    if math.isnan(r.lo):
        return "yes (no CI)" if r.median >= threshold else "**no** (no CI)"
    return "yes" if r.lo >= threshold else "**no**" if r.hi < threshold else "unclear (CI straddles)"


def chart(gs: Groups, path: Path) -> None:
    """Horizontal bars with 95% intervals: ours best over torch fastest, manual over autograd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for g in sorted((g for g in gs.values() if not g.sweep), key=lambda g: (g.device, g.mode, g.op, g.shape)):
        top = g.ratio("best", "torch" if g.mode != "step" else "autograd")
        eager = g.ratio("manual", "autograd")
        if top is None and eager is None:
            continue
        rows.append((f"{g.op} {g.shape} [{g.device} {g.mode}]", top, eager))
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
    for offset, idx, label in ((-0.2, 1, "ours best / torch fastest"), (0.2, 2, "manual / autograd")):
        ys, xs, err = [], [], [[], []]
        for i, row in enumerate(rows):
            r = row[idx]
            if r is None or (not math.isnan(r.lo) and bench.ratio_flags(r)):
                continue  # flagged ratios are not drawn either
            ys.append(i + offset)
            xs.append(r.median)
            lo, hi = (r.median, r.median) if math.isnan(r.lo) else (r.lo, r.hi)
            err[0].append(r.median - lo)
            err[1].append(hi - r.median)
        ax.barh(ys, xs, height=0.4, xerr=err, capsize=2, label=label)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (baseline / ours, median of paired rounds), log scale, 95% CI; "
                  "> 1: ours faster; flagged ratios omitted")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_points(gs: Groups) -> dict[tuple[str, str], list[Group]]:
    """(device, op) -> its size sweep's groups by input bytes: the sweep's points below the large
    shape, then the op's large fwd+bwd group (the same contenders among its own) as the top point."""
    sweeps: dict[tuple[str, str], list[Group]] = {}
    for g in gs.values():
        if g.sweep:
            sweeps.setdefault((g.device, g.op), []).append(g)
    for g in gs.values():
        if g.sweep_top and (g.device, g.op) in sweeps:
            sweeps[g.device, g.op].append(g)
    return {key: sorted(points, key=lambda g: g.size or 0) for key, points in sweeps.items()}


def sweep_chart(gs: Groups, path: Path) -> bool:
    """A panel per op: manual's speedup over autograd and over native against input size (log x)."""
    sweeps = sweep_points(gs)
    if not sweeps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cols = min(3, len(sweeps))
    nrows = math.ceil(len(sweeps) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, ((device, op), points) in zip(axes.flat, sorted(sweeps.items())):
        for baseline in ("autograd", "native"):
            rs = [(g.size, g.ratio("manual", baseline)) for g in points]
            rs = [(x, r) for x, r in rs if r is not None]
            if not rs:
                continue
            xs = [x for x, _ in rs]
            ax.plot(xs, [r.median for _, r in rs], marker="o", label=f"{baseline} / manual")
            ax.fill_between(xs, [r.lo for _, r in rs], [r.hi for _, r in rs], alpha=0.2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{op} ({device}, fwd+bwd)", fontsize=9)
        ax.set_xlabel("input bytes", fontsize=8)
        ax.set_ylabel("speedup of manual (95% CI)", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(sweeps):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(runs: list[dict], memory: list[dict] | None) -> tuple[str, Groups]:
    gs = bench.groups([b for run in runs for b in run["benchmarks"]], memory)
    body, flagged = tables(gs)
    text = header(runs[0], gs) + body
    text += ["### Flagged", "", "Not headline numbers: a ratio beyond "
             f"{bench.ABSURD_RATIO:g}x either way, or a 95% CI wider than {bench.WIDE_CI:g}x.", ""]
    text += flagged or ["None."]
    text.append("")
    for device in sorted({g.device for g in gs.values()}):
        text += [f"### Targets ({device})", "", targets(gs, device), ""]
        memory = memory_targets(gs, device)
        if memory.count("\n") > 1:  # a row beyond the header
            text += [f"### Memory targets ({device})", "", memory, ""]
    return "\n".join(text) + "\n", gs


def main_report(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("times", type=Path, nargs="+", help="pytest-benchmark JSON files of the timing run")
    p.add_argument("--memory", type=Path, help="JSON of the memory pass (BACKPROP_BENCH=memory)")
    p.add_argument("--out", type=Path, required=True, help="directory for report.md, the charts, history.csv")
    p.add_argument("--no-history", action="store_true", help="do not append to OUT/history.csv")
    args = p.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.times]
    text, gs = report(runs, load(args.memory) if args.memory else None)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text)
    chart(gs, args.out / "speedups.png")
    wrote = [args.out / "report.md", args.out / "speedups.png"]
    if sweep_chart(gs, args.out / "sweep.png"):
        wrote.append(args.out / "sweep.png")
    if not args.no_history:
        for path in args.times:
            bench.append_history(path, args.out / "history.csv")
        wrote.append(args.out / "history.csv")
    print("wrote " + ", ".join(map(str, wrote)))
    warning = bench.busy_warning(runs[0])
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def compare(old: dict, new: dict, threshold: float) -> tuple[list[str], bool]:
    """Lines of the comparison, and whether a slowdown's interval lies wholly above threshold."""
    a, b = bench.groups(old["benchmarks"]), bench.groups(new["benchmarks"])
    lines = [f"slowdown of ours from OLD to NEW, relative to autograd in the same rounds "
             f"(median [95% CI]; fails above {threshold:g}x):", ""]
    failed = False
    for key in sorted(set(a) & set(b)):
        ga, gb = a[key], b[key]
        if not (ga.paired and gb.paired and "autograd" in ga.times and "autograd" in gb.times):
            continue
        for c in bench.OURS:
            if c not in ga.times or c not in gb.times:
                continue
            ra = [x / y for x, y in zip(ga.times["autograd"], ga.times[c])]
            rb = [x / y for x, y in zip(gb.times["autograd"], gb.times[c])]
            change = bench.ratio_change(ra, rb)
            if change.lo > threshold:
                status, failed = "SLOWER", True
            elif change.hi < threshold:
                status = "ok"
            else:
                status = "ok (CI includes the threshold: not shown to be slower)"
            lines.append(f"{status:8s} {' '.join(key)} {c}: {change.median:.2f}x "
                         f"[{change.lo:.2f}, {change.hi:.2f}]")
    if len(lines) == 2:
        lines.append("no paired group in both runs: nothing to compare")
    return lines, failed


def main_compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="report.py compare", description="compare two paired runs")
    p.add_argument("runs", type=Path, nargs="*", help="OLD.json NEW.json")
    p.add_argument("--latest", type=Path, help="compare the two newest JSON files under this folder")
    p.add_argument("--threshold", type=float, default=1.25, help="fail when a slowdown's CI lies above this")
    args = p.parse_args(argv)
    if args.latest:
        found = sorted(args.latest.rglob("*.json"), key=lambda f: f.stat().st_mtime)
        if len(found) < 2:
            print(f"fewer than two runs under {args.latest}: nothing to compare yet")
            return 0
        paths = found[-2:]
    elif len(args.runs) == 2:
        paths = args.runs
    else:
        p.error("give OLD.json NEW.json, or --latest DIR")
    print(f"OLD {paths[0]}\nNEW {paths[1]}")
    lines, failed = compare(*(json.loads(path.read_text()) for path in paths), args.threshold)
    print("\n".join(lines))
    return 1 if failed else 0


def main_history(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="report.py history", description="plot an op's ratio over commits")
    p.add_argument("csv", type=Path)
    p.add_argument("op")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = args.out or args.csv.parent / f"history-{args.op}.png"
    print(f"wrote {bench.plot_history(args.csv, args.op, out, device=args.device)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return main_compare(argv[1:])
    if argv[:1] == ["history"]:
        return main_history(argv[1:])
    return main_report(argv)


if __name__ == "__main__":
    raise SystemExit(main())
