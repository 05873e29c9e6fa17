"""The benchmark report's judgement (backprop/bench.py, benchmarks/report.py) on synthetic runs:
intervals, flags for unstable rounds and absurd ratios, the busy-machine warning, compare's
verdict, the history. No benchmark runs here."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from backprop import bench

spec = importlib.util.spec_from_file_location("report", Path(__file__).parents[1] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def entry(op, shape, mode, times, device="cpu", **extra):
    """A paired test's pytest-benchmark entry: times = {contender: [seconds per round]}."""
    return {"fullname": f"{op}-{shape}-{mode}-paired", "stats": {"median": 0.0},
            "extra_info": {"op": op, "shape": shape, "mode": mode, "device": device, "variant": "paired",
                           **extra, "paired": {"times": times, "threads": 1, "load": [0.1, 0.2]}}}


def run(*entries, load=(0.1, 1.2), cores=2, when="2025-01-01T00:00:00", busy_start=None):
    return {"datetime": when, "commit_info": {"id": "abc1234"},
            "machine_info": {"cpu": {"brand_raw": "Test CPU"},
                             "backprop": {"torch": "2.13.0", "cpus": cores, "load_start": load[0],
                                          "load_end": load[1], "busy_start": busy_start,
                                          "threads": {"small": 1, "large": 1}}},
            "benchmarks": list(entries)}


def steady(t, n=30, jitter=0.02, seed=0):
    return list(t * (1 + jitter * np.random.default_rng(seed).standard_normal(n)))


def test_bootstrap_ci_of_a_known_sample():
    # the median of 1..99 is 50; its 95% interval from order statistics is about [40, 60]
    lo, hi = bench.bootstrap_median_ci(range(1, 100))
    assert 38 <= lo <= 45 and 55 <= hi <= 62
    assert bench.bootstrap_median_ci([3.0] * 10) == (3.0, 3.0)  # no spread, no width
    assert bench.bootstrap_median_ci(range(1, 100)) == (lo, hi)  # fixed seed: reproducible


def test_paired_ratio_pairs_rounds():
    # the machine slows both contenders alike in round 2: pairing cancels it
    base, ours = [2.0, 20.0, 2.0, 2.0, 2.0], [1.0, 10.0, 1.0, 1.0, 1.0]
    assert bench.paired_ratio(base, ours) == (2.0, 2.0, 2.0)


def test_steady_rounds_give_a_narrow_headline():
    g = bench.groups(run(entry("tanh", "large", "bwd", {"manual": steady(1e-3), "native": steady(2e-3, seed=1)}))
                     ["benchmarks"])[("cpu", "bwd", "tanh", "large")]
    r = g.ratio("best", "torch")
    assert 1.9 < r.lo <= r.median <= r.hi < 2.1
    assert not bench.ratio_flags(r) and not g.unstable("best", "torch")
    text, _ = report.report([run(entry("tanh", "large", "bwd", {"manual": steady(1e-3),
                                                                  "native": steady(2e-3, seed=1)}))], None)
    assert report.fmt_ratio(r) in text and "flagged†" not in text


def test_unstable_rounds_are_flagged():
    wild = [1e-3, 1e-3, 5e-3, 1e-3, 9e-3, 1e-3, 4e-3, 1e-3, 6e-3, 1e-3]  # p80/p20 far above 1.5
    g = bench.groups([entry("tanh", "small", "bwd", {"manual": steady(1e-3, n=10), "autograd": wild})])
    assert g[("cpu", "bwd", "tanh", "small")].unstable("manual", "autograd") == ["autograd rounds p80/p20 = 5.20"]
    text, _ = report.report([run(entry("tanh", "small", "bwd", {"manual": steady(1e-3, n=10), "autograd": wild}))],
                            None)
    assert "⚠ autograd rounds p80/p20" in text


def test_absurd_ratio_is_not_a_headline():
    times = {"manual": steady(10e-6), "autograd": steady(16e-3, seed=2)}  # 1600x: contention, not speed
    text, _ = report.report([run(entry("cross_entropy", "notebook 32x27", "fwd+bwd", times))], None)
    table = text.split("### Flagged")[0]
    assert "1600" not in table and "flagged†" in table
    flagged = text.split("### Flagged")[1].split("### Targets")[0]
    assert "cross_entropy notebook 32x27" in flagged and "beyond 50x" in flagged
    assert "flagged†" in text.split("### Targets")[1]  # nor a target's measurement


def test_wide_interval_is_not_a_headline():
    rng = np.random.default_rng(3)
    times = {"manual": list(rng.uniform(1e-3, 9e-3, 9)), "autograd": list(rng.uniform(1e-3, 9e-3, 9))}
    r = bench.paired_ratio(times["autograd"], times["manual"])
    assert r.hi / r.lo > 2 and any("wider than 2x" in f for f in bench.ratio_flags(r))


def test_busy_machine_warns():
    assert bench.busy_warning(run(load=(0.2, 1.5))) is None  # the run's own thread at the end
    warning = bench.busy_warning(run(load=(5.1, 6.0)))
    assert "busy" in warning and "5.10" in warning
    text, _ = report.report([run(entry("tanh", "large", "bwd", {"manual": steady(1e-3)}), load=(5.1, 6.0))], None)
    assert "**Warning:** the machine was busy" in text


def test_the_sampled_cores_decide_the_start_not_the_lagging_load():
    """A load average of 1.12 on 2 cores from a test run that had just ended, an idle machine by
    /proc/stat: no warning; busy by /proc/stat with a low load average: a warning."""
    assert bench.busy_warning(run(load=(1.12, 1.0), busy_start=0.05)) is None
    warning = bench.busy_warning(run(load=(0.3, 1.0), busy_start=1.4))
    assert "busy" in warning and "cores busy with others at the start: 1.40" in warning
    text, _ = report.report([run(entry("tanh", "large", "bwd", {"manual": steady(1e-3)}), busy_start=0.05)], None)
    assert "cores busy with other processes at the start (/proc/stat, 0.5 s): 0.05" in text


def test_busy_cores_now_reads_proc_stat(monkeypatch):
    """(busy, total) ticks of all CPUs: a quarter busy on 4 CPUs is one core; unreadable: None, and
    the policy falls back to the load average."""
    from backprop.bench import stats

    samples = iter([(1000, 4000), (1100, 4400)])
    monkeypatch.setattr(stats, "_cpu_jiffies", lambda: next(samples))
    monkeypatch.setattr(stats.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(stats.time, "sleep", lambda s: None)
    assert stats.busy_cores_now() == 1.0
    monkeypatch.setattr(stats, "_cpu_jiffies", lambda: None)
    assert stats.busy_cores_now() is None
    monkeypatch.setattr(stats, "busy_at_start", lambda: None)
    monkeypatch.setattr(stats, "cores", lambda: 2)
    monkeypatch.setattr(stats, "LOAD_AT_IMPORT", 1.5)
    assert stats.busy()
    monkeypatch.setattr(stats, "busy_at_start", lambda: 0.1)
    assert not stats.busy()  # the sample wins over the lagging load average
    monkeypatch.setattr(stats, "busy_at_start", lambda: 1.2)
    assert stats.busy() and stats.thread_count("large") == 1


def test_proc_stat_parses_here():
    from backprop.bench import stats

    ticks = stats._cpu_jiffies()
    if ticks is None:
        pytest.skip("no /proc/stat on this OS")
    busy, total = ticks
    assert 0 <= busy <= total and total > 0


def _compare(old_manual, new_manual, threshold=1.25):
    old = run(entry("tanh", "large", "bwd", {"manual": old_manual, "autograd": steady(2e-3, seed=4)}))
    new = run(entry("tanh", "large", "bwd", {"manual": new_manual, "autograd": steady(2e-3, seed=5)}))
    return report.compare(old, new, threshold)


def test_compare_fails_when_the_interval_lies_above_the_threshold():
    lines, failed = _compare(steady(1e-3), steady(1.6e-3, seed=6))  # 1.6x slower, tight rounds
    assert failed and any(line.startswith("SLOWER") for line in lines)


def test_compare_passes_when_the_interval_includes_the_threshold():
    rng = np.random.default_rng(7)
    noisy = list(1.25e-3 * rng.uniform(0.6, 1.6, 30))  # median slowdown near 1.25x, wide interval
    lines, failed = _compare(steady(1e-3), noisy)
    change = bench.ratio_change([2.0 / 1e-3] * 2, [2.0 / 1.25e-3] * 2)
    assert math.isclose(change.median, 1.25)
    assert not failed and any("CI includes the threshold" in line for line in lines)


def test_compare_passes_a_steady_run():
    lines, failed = _compare(steady(1e-3), steady(1e-3, seed=8))
    assert not failed and any(line.startswith("ok ") for line in lines)


def test_compare_cli_reads_files(tmp_path):
    old = run(entry("tanh", "large", "bwd", {"manual": steady(1e-3), "autograd": steady(2e-3, seed=4)}))
    new = run(entry("tanh", "large", "bwd", {"manual": steady(2e-3), "autograd": steady(2e-3, seed=5)}))
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert report.main(["compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    assert report.main(["compare", str(tmp_path / "old.json"), str(tmp_path / "old.json")]) == 0


def test_history_appends_once_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    times = tmp_path / "times.json"
    times.write_text(json.dumps(run(entry("tanh", "large", "bwd", {"manual": steady(1e-3),
                                                                     "autograd": steady(2e-3, seed=1)}))))
    csv_path = tmp_path / "history.csv"
    assert bench.append_history(times, csv_path) == 2  # a row per contender
    assert bench.append_history(times, csv_path) == 0  # the same run is not added twice
    rows = csv_path.read_text().splitlines()
    assert rows[0].split(",") == bench.HISTORY_FIELDS and "abc1234" in rows[1]
    assert bench.plot_history(csv_path, "tanh", tmp_path / "h.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no cpu rows"):
        bench.plot_history(csv_path, "linear", tmp_path / "l.png")


def test_paired_runner_interleaves():
    calls = []
    runner = bench.PairedRunner({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, min_time=0)
    runner.warm_up()
    runner.calibrate()
    for _ in range(5):
        runner.round()
    assert len(runner.times["a"]) == len(runner.times["b"]) == 6  # calibration kept: one call each
    assert calls.count("a") == calls.count("b") == 7
    assert bench.rounds_for(0.5, 2.0, 5, 50) == 5 and bench.rounds_for(0.01, 2.0, 5, 50) == 50


@pytest.mark.parametrize("cost, met", [(1.03, "yes"), (1.25, "**no**")])
def test_custom_op_path_against_the_kernel(cost, met):
    """The custom-op contender's ratio to the kernel (manual / custom-op) is in the group's row,
    its <= 10% target judged at the large shapes only, and its history row is against manual."""
    times = {"manual": steady(1e-3), "custom-op": steady(cost * 1e-3, seed=1), "autograd": steady(2e-3, seed=2)}
    r = bench.paired_ratio(times["manual"], times["custom-op"])
    assert abs(r.median - 1 / cost) < 0.02
    text, _ = report.report([run(entry("tanh", "large 16M", "fwd+bwd", times),
                                 entry("tanh", "notebook 32x200", "fwd+bwd", times))], None)
    row = next(line for line in text.splitlines() if line.startswith("| tanh | large 16M | manual"))
    assert report.fmt_ratio(r) in row
    targets = [line for line in text.split("### Targets")[1].splitlines() if "custom-op path" in line]
    assert targets == [f"| custom-op path <= 10% over the kernel | tanh | large 16M | {report.fmt_ratio(r)} | {met} |"]
    rows = {row["contender"]: row for row in bench.history_rows(run(entry("tanh", "large 16M", "fwd+bwd", times)))}
    assert rows["custom-op"]["baseline"] == "manual"


def test_compiled_models_step_row():
    """The train step's compiled-models group heads its row with our ops' model against torch's,
    and the (no-bar) comparison is in the targets; the other step targets leave the group alone."""
    times = {"custom-op-compiled": steady(2e-3), "functional-compiled": steady(1e-3, seed=1)}
    r = bench.paired_ratio(times["functional-compiled"], times["custom-op-compiled"])
    text, _ = report.report([run(entry("train_step", "hidden=200 batch=32 compiled models", "step", times))], None)
    row = next(line for line in text.splitlines() if line.startswith("| train_step | hidden=200 batch=32 compiled"))
    assert "custom-op-compiled" in row and report.fmt_ratio(r) in row and 0.45 < r.median < 0.55
    targets = [line for line in text.split("### Targets")[1].splitlines() if "| train_step |" in line]
    assert len(targets) == 1 and "torch functionals" in targets[0] and "**no**" in targets[0]


def _target_rows(times, shape="large 16M", mode="fwd+bwd"):
    gs = bench.groups(run(entry("tanh", shape, mode, times))["benchmarks"])
    return [row for row in report.targets(gs).splitlines() if "torch fastest" in row]


def test_fastest_target_is_against_torchs_fastest_path():
    # ours 1.2x autograd but 0.8x native: torch's fastest is native, so the bar is missed
    rows = _target_rows({"manual": steady(1e-3), "autograd": steady(1.2e-3, seed=1),
                         "native": steady(0.8e-3, seed=2)})
    assert len(rows) == 1 and "large, fwd+bwd" in rows[0]
    assert "0.80x" in rows[0] and rows[0].endswith("| **no** |")
    # our compiled path beats every torch path: met
    rows = _target_rows({"manual": steady(3e-3), "manual-compiled": steady(1e-3, seed=3),
                         "autograd": steady(1.5e-3, seed=1), "native": steady(1.2e-3, seed=2)})
    assert "1.20x" in rows[0] and rows[0].endswith("| yes |")
    assert len(_target_rows({"manual": steady(1e-3), "native": steady(2e-3)}, shape="notebook 32x200",
                            mode="bwd")) == 1


def test_every_op_carries_issue_16s_bar():
    from backprop.testing.opinfo import BANDWIDTH, FASTEST, OP_DB

    for info in OP_DB:
        assert set(FASTEST) <= set(info.speed_targets), info.name
    memory_bound = {info.name for info in OP_DB if set(BANDWIDTH) <= set(info.speed_targets)}
    assert {"tanh", "batch_norm", "cross_entropy", "logsumexp"} <= memory_bound
    assert all(t[4] >= 0.7 for t in BANDWIDTH)
    gs = bench.groups(run(entry("tanh", "large 16M", "bwd", {"manual": steady(1e-3),
                                                             "copy": steady(0.65e-3, seed=1)}))["benchmarks"])
    row = next(r for r in report.targets(gs).splitlines() if "70% of copy" in r)
    assert "65% of copy" in row and row.endswith("| **no** |")  # 65% met the old 50% bar


def test_cpu_peak_counts_each_free_when_it_happens():
    """A scope that frees what its children allocated (an autograd Function's forward, the
    engine's node): 8 MiB alive at once inside it, 2 MiB returned. Summing each op's own memory
    at the op's start counted the scope's frees first and read 2 MiB."""

    def step():
        with torch.autograd.profiler.record_function("scope"):
            a, b = torch.empty(2**20), torch.empty(2**20)  # 4 MiB each
            del a, b
        return torch.empty(2**19)

    assert bench.cpu_peak_bytes(step) == 8 * 2**20


def test_memory_targets_judge_the_memory_pass():
    """linear_cross_entropy's memory targets (the op table's): the contender's extra peak over the
    pair's, from the memory pass, met at most 1/4; none shown without a memory pass."""
    shape = "large 2048x512->32768"
    times = {c: steady(1e-3, seed=k) for k, c in enumerate(["manual", "adapter", "autograd", "native"])}
    timing = run(entry("linear_cross_entropy", shape, "fwd+bwd", times))
    memory = [{"extra_info": {"op": "linear_cross_entropy", "shape": shape, "mode": "fwd+bwd", "device": "cpu",
                              "variant": v, "peak_bytes": mib * 2**20}}
              for v, mib in (("manual", 200), ("adapter", 100), ("autograd", 768), ("native", 204))]
    text, _ = report.report([timing], memory)
    rows = text.split("### Memory targets (cpu)")[1].split("###")[0].strip().splitlines()[2:]
    assert rows == [
        f"| adapter path's extra peak <= 1/4 of F.linear + F.cross_entropy's | linear_cross_entropy | {shape} "
        "| 100 / 768 | 0.130 | yes (at most 0.25) |",
        f"| kernel path's extra peak <= 1/4 of F.linear + F.cross_entropy's | linear_cross_entropy | {shape} "
        "| 200 / 768 | 0.260 | **no** (at most 0.25) |"]
    text, _ = report.report([timing], None)
    assert "| — | — | — |" in text.split("### Memory targets (cpu)")[1]
    assert "### Memory targets" not in report.report([run(entry("tanh", "large 16M", "bwd", times))], None)[0]


def test_the_large_group_is_the_top_of_its_ops_size_sweep():
    """The sweep times its points below the large shape; the large fwd+bwd group (marked sweep_top
    by benchmarks/conftest.py) is its top point, after them by size. An op without a sweep (no
    sweep points) gets no panel from its large group alone, and other groups join no sweep."""
    times = {"manual": steady(1e-3), "autograd": steady(2e-3, seed=1)}
    points = [entry("tanh", f"sweep{i} {i}", "fwd+bwd", times, sweep=True, size=10 ** (i + 1)) for i in range(4)]
    top = entry("tanh", "large 16M", "fwd+bwd", times, sweep_top=True, size=10 ** 6)
    lone = entry("linear_cross_entropy", "large 2048x512->32768", "fwd+bwd", times, sweep_top=True, size=10)
    other = entry("tanh", "large 16M", "bwd", times, size=10 ** 7)
    gs = bench.groups(run(top, *points, lone, other)["benchmarks"])
    sweeps = report.sweep_points(gs)
    assert list(sweeps) == [("cpu", "tanh")]
    assert [g.shape for g in sweeps["cpu", "tanh"]] == [f"sweep{i} {i}" for i in range(4)] + ["large 16M"]


def test_resident_peak_sees_what_is_alive_at_once():
    """The in-process peak of the large shapes (no profiler): 64 MiB then 32 MiB alive together
    with a kept 32 MiB (96 MiB), 64 MiB freed before 32 more are made; and a step that only
    reuses memory freed before the call adds its new pages only. Agrees with the profiler's."""

    def step():
        a, b = torch.ones(16 << 20), torch.ones(8 << 20)  # 64 MiB, 32 MiB
        del a
        return b, torch.ones(8 << 20)

    if bench.resident_peak_bytes(step) is None:
        pytest.skip("no /proc/self/clear_refs or glibc here: the profiler measures")
    # the least of three: the high-water mark is the process's, and another of its threads (the
    # session's kernel loader, for one) may allocate during a call (a CI run read 128 MiB once)
    resident = min(bench.resident_peak_bytes(step) for _ in range(3))
    assert abs(resident - 96 * 2**20) < 2**20 and bench.resident_peaks_readable()
    assert abs(resident - bench.cpu_peak_bytes(step)) < 2**20
    step()  # freed heap pages from earlier calls are given back before the next measurement
    small = min(bench.resident_peak_bytes(lambda: torch.ones(4 << 20)) for _ in range(3))
    assert abs(small - 16 * 2**20) < 2**20
