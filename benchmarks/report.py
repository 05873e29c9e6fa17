"""Turn a pytest-benchmark JSON run into the report people read: a markdown table per device
and mode, the targets of the speed issue (met or missed, with the measured ratio), and a PNG
chart of the speedups.

    python benchmarks/report.py times.json [more.json ...] [--memory memory.json] --out DIR

Every ratio is autograd's median time over the contender's, from the same run on the same
inputs (above 1: ours is faster). "% copy" is the contender's achieved bandwidth (the op's
minimal bytes / its time) over a copy of the same bytes measured in the same run; as both move
the same bytes, it is the copy's time over the contender's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from backprop.testing.opinfo import OP_DB  # noqa: E402

CONTENDERS = ["manual", "manual-compiled", "autograd", "autograd-compiled", "native", "copy", "notebook"]

# (op, shape regex, mode, contender, baseline, threshold, what): the speed issue's targets, from
# the op table (each op's own, and >= 1x autograd at notebook scale for every op), then the step's.
# "best" is the faster of manual and manual-compiled: the best public path.
TARGETS = [
    *((info.name, *target) for info in OP_DB for target in info.speed_targets),
    *((info.name, "notebook", "fwd+bwd", "best", "autograd", 1.0, ">= 1x at notebook scale") for info in OP_DB),
    ("train_step", "", "step", "manual", "autograd", 2.5, "eager manual step >= 2.5x autograd"),
    ("train_step", "", "step", "manual-compiled", "autograd", 5.0, "compiled manual step >= 5x autograd"),
]


# {(device, mode): {(op, shape): {variant: {"median": s, "peak": bytes, "bytes": n}}}}
Table = dict[tuple[str, str], dict[tuple[str, str], dict[str, dict]]]


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["benchmarks"]


def collect(times: list[dict], memory: list[dict] | None) -> Table:
    """{(device, mode): {(op, shape): {variant: {"median": s, "peak": bytes, "bytes": n}}}}"""
    peaks = {b["fullname"]: b["extra_info"].get("peak_bytes") for b in memory or []}
    table: Table = defaultdict(lambda: defaultdict(dict))
    for b in times:
        info = b["extra_info"]
        entry = {"median": b["stats"]["median"], "bytes": info.get("bytes"),
                 "peak": info.get("peak_bytes", peaks.get(b["fullname"]))}
        table[(info["device"], info.get("mode", "step"))][(info["op"], info["shape"])][info["variant"]] = entry
    return table


def best(row: dict) -> tuple[str, dict] | None:
    present = [(v, row[v]) for v in ("manual", "manual-compiled") if v in row]
    return min(present, key=lambda kv: kv[1]["median"]) if present else None


def ratio(row: dict, contender: str, baseline: str) -> float | None:
    picked = best(row) if contender == "best" else (contender, row[contender]) if contender in row else None
    if picked is None or baseline not in row:
        return None
    return row[baseline]["median"] / picked[1]["median"]


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.3g}"


def markdown(table: Table, machine: str) -> str:
    lines = [f"Machine: {machine}", ""]
    for (device, mode), rows in sorted(table.items()):
        variants = [v for v in CONTENDERS if any(v in r for r in rows.values())]
        lines += [f"### {device}, {mode}", "",
                  "| op | shape | " + " | ".join(variants) + " | manual speedup | best speedup | "
                  "% copy (best) | peak MiB (" + ", ".join(v for v in variants if v != "copy") + ") |",
                  "|---|---|" + "---:|" * (len(variants) + 4)]
        for (op, shape), row in sorted(rows.items()):
            cells = [fmt_time(row[v]["median"]) if v in row else "—" for v in variants]
            manual, top = ratio(row, "manual", "autograd"), ratio(row, "best", "autograd")
            copy = ratio(row, "best", "copy")
            peaks = [fmt_bytes(row[v]["peak"]) if v in row else "—" for v in variants if v != "copy"]
            peaks = peaks if any(peaks) else ["not measured"]
            lines.append(f"| {op} | {shape} | " + " | ".join(cells)
                         + f" | {_x(manual)} | {_x(top)} ({best(row)[0] if best(row) else ''}) | "
                         + (f"{100 * copy:.0f}%" if copy is not None else "—") + " | "
                         + " / ".join(peaks) + " |")
        lines.append("")
    return "\n".join(lines)


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def targets(table: Table, device: str = "cpu") -> str:
    lines = ["| target | op | shape | measured | met |", "|---|---|---|---:|---|"]
    for op, pattern, mode, contender, baseline, threshold, what in TARGETS:
        for (op_, shape), row in sorted(table.get((device, mode), {}).items()):
            if op_ != op or not re.search(pattern, shape):
                continue
            r = ratio(row, contender, baseline)
            met = "—" if r is None else ("yes" if r >= threshold else "**no**")
            shown = f"{100 * r:.0f}% of copy" if r is not None and baseline == "copy" else _x(r)
            lines.append(f"| {what} | {op} | {shape} | {shown} | {met} |")
    return "\n".join(lines)


def chart(table: Table, path: Path) -> None:
    """Horizontal bars: autograd time / ours, eager and best path, per case, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, eager, top = [], [], []
    for (device, mode), rows in sorted(table.items()):
        for (op, shape), row in sorted(rows.items()):
            if ratio(row, "manual", "autograd") is None:
                continue
            labels.append(f"{op} {shape} [{device} {mode}]")
            eager.append(ratio(row, "manual", "autograd"))
            top.append(ratio(row, "best", "autograd"))
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(labels) + 1.5))
    y = range(len(labels))
    ax.barh([i + 0.2 for i in y], eager, height=0.4, label="manual (eager)")
    ax.barh([i - 0.2 for i in y], top, height=0.4, label="best public path")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over autograd (autograd median / ours), log scale; > 1: ours faster")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_line(times_json: dict) -> str:
    m = times_json.get("machine_info", {})
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    extra = m.get("backprop", {})
    return (f"{cpu}, {extra.get('cpus', '?')} cores, torch {extra.get('torch', '?')}, "
            f"{extra.get('threads', '?')} threads" + (f", GPU {extra['gpu']}" if extra.get("gpu") else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("times", type=Path, nargs="+", help="pytest-benchmark JSON files of the timing run")
    p.add_argument("--memory", type=Path, help="JSON of the memory pass (BACKPROP_BENCH=memory)")
    p.add_argument("--out", type=Path, required=True, help="directory for report.md and speedups.png")
    args = p.parse_args(argv)
    raw = json.loads(args.times[0].read_text())
    runs = [b for path in args.times for b in load(path)]
    table = collect(runs, load(args.memory) if args.memory else None)
    args.out.mkdir(parents=True, exist_ok=True)
    devices = sorted({device for device, _ in table})
    text = [markdown(table, machine_line(raw))]
    for device in devices:
        text += [f"### Targets ({device})", "", targets(table, device), ""]
    (args.out / "report.md").write_text("\n".join(text) + "\n")
    chart(table, args.out / "speedups.png")
    print(f"wrote {args.out / 'report.md'} and {args.out / 'speedups.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
