"""The ``backprop`` command: the makemore backprop-ninja notebook as a program.

    backprop check    the gradient table: every atom by hand against autograd, then the fused kernels
    backprop train    train the MLP with manual gradients, calibrate BatchNorm, evaluate, sample
    backprop sample   sample names from a trained checkpoint
    backprop bench    time every kernel against autograd, write the report and the chart
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}
COMPILE_FROM_STEPS = 50_000


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= low, refused with 'expected <what>'."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "a non-negative integer")
# batch norm's variance is Bessel-corrected (1/(n-1)), as in the notebook: one row has none
batch_size_int = _int_at_least(2, "an integer >= 2 (batch norm's 1/(n-1) variance needs two rows)")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _data_options(p: argparse.ArgumentParser, hidden: int) -> None:
    from backprop import makemore

    p.add_argument("--data", type=Path, default=makemore.DEFAULT_DATA,
                   help="word list, one word per line (default: the shipped data/names.txt)")
    p.add_argument("--split-seed", type=int, default=makemore.SPLIT_SEED,
                   help="random.seed for the 80/10/10 split")
    p.add_argument("--hidden", type=positive_int, default=hidden, help=f"hidden units (default {hidden})")
    p.add_argument("--batch-size", type=batch_size_int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")


def build_parser() -> argparse.ArgumentParser:
    from backprop import makemore

    parser = argparse.ArgumentParser(prog="backprop", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="the notebook's gradient table against autograd")
    _data_options(check, hidden=64)
    check.add_argument("--dtype", choices=list(DTYPES), default="float32")
    check.add_argument("--seed", type=int, default=makemore.INIT_SEED,
                       help="generator seed for the init and the batch")

    train = sub.add_parser("train", help="train with manual gradients, then evaluate and sample")
    _data_options(train, hidden=200)
    train.add_argument("--steps", type=positive_int, default=200_000)
    train.add_argument("--lr", type=positive_float, default=0.1)
    train.add_argument("--lr-decay-step", type=non_negative_int, default=100_000,
                       help="step from which the learning rate is lr/10")
    train.add_argument("--backward", choices=["manual", "autograd"], default="manual")
    train.add_argument("--verify-every", type=non_negative_int, default=0, metavar="K",
                       help="check manual gradients against autograd every K steps (0: never)")
    train.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                       help="run the manual step compiled (makemore.compiled_trainer: built ahead of "
                            "time on the CPU and cached in ~/.cache/backprop, torch.compile on CUDA); "
                            f"auto: yes for --steps >= {COMPILE_FROM_STEPS:,} when a C++ compiler is "
                            "found, since the first build costs ~30 s (default auto)")
    train.add_argument("--seed", type=int, default=makemore.INIT_SEED)
    train.add_argument("--out", type=Path, default=None,
                       help="write loss.png, summary.json and model.pt here")

    sample = sub.add_parser("sample", help="sample names from a checkpoint written by train --out")
    sample.add_argument("--checkpoint", type=Path, required=True)
    sample.add_argument("-n", type=positive_int, default=20)
    sample.add_argument("--seed", type=int, default=makemore.INIT_SEED + 10)

    bench = sub.add_parser("bench", help="run benchmarks/ (timing, then CPU memory), write the report")
    bench.add_argument("--out", type=Path, default=Path("bench-results"),
                       help="directory for times.json, memory.json, report.md, speedups.png")
    bench.add_argument("--quick", action="store_true", help="notebook-scale shapes and the train step only")
    bench.add_argument("--no-memory", action="store_true", help="skip the CPU memory pass")
    bench.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select cases")
    return parser


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    return torch.device(name)


def _dataset(parser, args):
    from backprop import makemore

    try:
        return makemore.load_dataset(args.data, args.split_seed)
    except ValueError as e:
        parser.error(str(e))


def cmd_check(parser, args) -> int:
    from backprop import makemore

    device = _device(parser, args.device)
    ds = _dataset(parser, args)
    params, Xb, Yb = makemore.first_batch(ds, args.hidden, batch_size=args.batch_size, seed=args.seed,
                                          dtype=DTYPES[args.dtype], device=device)
    loss, rows = makemore.gradient_table(params, Xb, Yb)
    summary = ds.summary() | {"parameters": makemore.count_params(params), "loss": loss}
    ok = all(r.approximate for r in rows)
    if args.json:
        print(json.dumps(summary | {"rows": [r.__dict__ for r in rows]}))
        return 0 if ok else 1
    tr, va, te = summary["examples"]
    print(f"data        {args.data}")
    print(f"words       {summary['words']}   vocabulary {summary['vocab_size']}   "
          f"examples train {tr} / val {va} / test {te}")
    print(f"parameters  {summary['parameters']} (hidden {args.hidden})   batch {args.batch_size}   "
          f"{args.dtype} on {device}   loss {loss:.6f}")
    width = max(len(r.name) for r in rows)
    for title, part in (("exercise 1: every atom and parameter by hand, against autograd",
                         rows[:len(makemore.EXERCISE1_ROWS)]),
                        ("exercises 2 and 3: the fused library kernels, against autograd",
                         rows[len(makemore.EXERCISE1_ROWS):])):
        print(f"\n{title}")
        for r in part:
            print(f"{r.name:{width}s} | exact: {str(r.exact):5s} | approximate: {str(r.approximate):5s} "
                  f"| maxdiff: {r.maxdiff:.3g}")
    exact = sum(r.exact for r in rows[:len(makemore.EXERCISE1_ROWS)])
    print(f"\n{exact}/{len(makemore.EXERCISE1_ROWS)} exercise-1 rows bit-exact; "
          f"{'all' if ok else 'NOT all'} rows approximately equal")
    return 0 if ok else 1


class Progress:
    """One status line on stderr: a bar, the loss and steps per second."""

    def __init__(self, stream=None):
        # sys.stderr looked up now, not at import: callers (and pytest) may have replaced it
        self.stream = sys.stderr if stream is None else stream
        self.start, self.last = time.perf_counter(), 0.0
        self.tty = self.stream.isatty()

    def __call__(self, step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        every = 0.2 if self.tty else 10.0
        if now - self.last < every and step != total:
            return
        self.last = now
        rate = step / max(now - self.start, 1e-9)
        filled = int(30 * step / total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {step}/{total}  loss {loss:.4f}  "
                f"{rate:,.0f} steps/s")
        end = "\n" if step == total or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def use_compile(args) -> bool:
    if args.compile == "no" or args.backward != "manual":
        return False
    if args.compile == "yes":
        return True
    from backprop.compiled import cpu_compiler_found

    return args.steps >= COMPILE_FROM_STEPS and cpu_compiler_found()


def cmd_train(parser, args) -> int:
    from backprop import _png, makemore

    device = _device(parser, args.device)
    if args.compile == "yes" and args.backward != "manual":
        parser.error("--compile yes applies to --backward manual only")
    ds = _dataset(parser, args)
    compiled = use_compile(args)

    def compile_failed(e: Exception) -> None:  # --compile auto: say so, then train eager
        nonlocal compiled
        compiled = False
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"backprop train: building the compiled step failed ({type(e).__name__}: {first_line}); "
              "training with the eager step (--compile yes makes this an error)", file=sys.stderr)

    start = time.perf_counter()
    try:
        model, losses = makemore.train(
            ds, steps=args.steps, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
            lr_decay_step=args.lr_decay_step, backward=args.backward,
            verify_every=args.verify_every, seed=args.seed, device=device, compile=compiled,
            on_compile_error=compile_failed if args.compile == "auto" else None,
            progress=Progress(),
        )
    except makemore.GradientDrift as e:
        print(f"backprop train: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    result = {f"{k}_loss": makemore.evaluate(model, *(t.to(device) for t in ds.splits[k]))
              for k in ("train", "val", "test")}
    result |= {"steps": args.steps, "seconds": round(seconds, 2), "backward": args.backward,
               "compiled": compiled,
               "samples": makemore.sample(model, 20)}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        _png.loss_curve(args.out / "loss.png", losses)
        (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        torch.save(model.state(), args.out / "model.pt")
    if args.json:
        print(json.dumps(result))
        return 0
    how = f"{args.backward} backward" + (", compiled step" if result["compiled"] else "")
    print(f"trained {args.steps} steps in {seconds:.1f} s ({how})")
    print(f"loss  train {result['train_loss']:.4f}  val {result['val_loss']:.4f}  "
          f"test {result['test_loss']:.4f}")
    print("samples: " + " ".join(result["samples"]))
    if args.out is not None:
        print(f"wrote {args.out / 'loss.png'}, {args.out / 'summary.json'}, {args.out / 'model.pt'}")
    return 0


def cmd_sample(parser, args) -> int:
    from backprop import makemore

    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {str(args.checkpoint)!r} does not exist (write one with train --out DIR)")
    try:
        state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")
        model = makemore.Model.from_state(state)
    except Exception as e:  # a corrupt or foreign file: report it, do not trace back
        parser.error(f"--checkpoint {str(args.checkpoint)!r} is not a backprop checkpoint: {e}")
    for word in makemore.sample(model, args.n, seed=args.seed):
        print(word)
    return 0


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_bench(parser, args) -> int:
    import os
    import subprocess

    if not (BENCHMARKS / "report.py").is_file():
        parser.error(f"bench runs the benchmarks/ folder of a source checkout, not found at {BENCHMARKS}")
    for module in ("pytest", "pytest_benchmark", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            parser.error(f"bench needs {module}: pip install -e '.[dev]'")
    args.out.mkdir(parents=True, exist_ok=True)
    keywords = (args.keyword, "notebook or train_step" if args.quick else None)
    select = " and ".join(f"({k})" for k in keywords if k)
    pytest = [sys.executable, "-m", "pytest", str(BENCHMARKS), "-q", "-p", "no:cacheprovider",
              "--benchmark-enable", "--benchmark-sort=name", *(["-k", select] if select else [])]
    runs = [("times", {}, ["--benchmark-min-rounds=3", "--benchmark-max-time=0.5"])]
    if not args.no_memory:
        runs.append(("memory", {"BACKPROP_BENCH": "memory"}, []))
    for name, env, extra in runs:
        print(f"backprop bench: {name} pass", file=sys.stderr, flush=True)
        quiet = subprocess.DEVNULL if name == "memory" else None
        done = subprocess.run([*pytest, f"--benchmark-json={args.out / (name + '.json')}", *extra],
                              env={**os.environ, **env}, stdout=quiet)
        if done.returncode != 0:
            print(f"backprop bench: the {name} pass failed (pytest exit {done.returncode})", file=sys.stderr)
            return 1
    memory = [] if args.no_memory else ["--memory", str(args.out / "memory.json")]
    return subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), str(args.out / "times.json"),
                           *memory, "--out", str(args.out)]).returncode


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"check": cmd_check, "train": cmd_train, "sample": cmd_sample, "bench": cmd_bench}
    return commands[args.command](parser, args)


if __name__ == "__main__":
    sys.exit(main())
