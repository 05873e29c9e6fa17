"""backprop check, train and sample: argparse's namespace in, the makemore package's calls, the
report out (a table, or one JSON object with --json)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from backprop.cli import plot
from backprop.cli.progress import Progress
from backprop.makemore import data, model, notebook
from backprop.makemore import train as training
from backprop.makemore.step import GradientDrift

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    return torch.device(name)


def _dataset(parser: argparse.ArgumentParser, args: argparse.Namespace) -> data.Dataset:
    if args.data is None:
        args.data = data.DEFAULT_DATA
    try:
        return data.load_dataset(args.data, args.split_seed)
    except ValueError as e:
        parser.error(str(e))


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    device = _device(parser, args.device)
    ds = _dataset(parser, args)
    params, Xb, Yb = notebook.first_batch(ds, args.hidden, batch_size=args.batch_size, seed=args.seed,
                                          dtype=DTYPES[args.dtype], device=device)
    loss, rows = notebook.gradient_table(params, Xb, Yb)
    summary = ds.summary() | {"parameters": model.count_params(params), "loss": loss}
    ok = all(r.approximate for r in rows)
    if args.json:
        print(json.dumps(summary | {"rows": [r.__dict__ for r in rows]}))
        return 0 if ok else 1
    tr, va, te = summary["examples"]
    n1 = len(notebook.EXERCISE1_ROWS)
    print(f"data        {args.data}")
    print(f"words       {summary['words']}   vocabulary {summary['vocab_size']}   "
          f"examples train {tr} / val {va} / test {te}")
    print(f"parameters  {summary['parameters']} (hidden {args.hidden})   batch {args.batch_size}   "
          f"{args.dtype} on {device}   loss {loss:.6f}")
    width = max(len(r.name) for r in rows)
    for title, part in (("exercise 1: every atom and parameter by hand, against autograd", rows[:n1]),
                        ("exercises 2 and 3: the fused library kernels, against autograd", rows[n1:])):
        print(f"\n{title}")
        for r in part:
            print(f"{r.name:{width}s} | exact: {str(r.exact):5s} | approximate: {str(r.approximate):5s} "
                  f"| maxdiff: {r.maxdiff:.3g}")
    exact = sum(r.exact for r in rows[:n1])
    print(f"\n{exact}/{n1} exercise-1 rows bit-exact; {'all' if ok else 'NOT all'} rows approximately equal")
    return 0 if ok else 1


def train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    device = _device(parser, args.device)
    if args.compile == "yes" and args.backward != "manual":
        parser.error("--compile yes applies to --backward manual only")
    ds = _dataset(parser, args)
    draw = args.out is not None and plot.available()
    if args.out is not None and not draw:
        print(f"backprop train: {plot.MISSING}; writing {args.out} without loss.png", file=sys.stderr)

    def compile_failed(e: Exception) -> None:  # --compile auto: say so; train goes on eager
        print(f"backprop train: building the compiled step failed ({type(e).__name__}: "
              f"{training.first_line(e)}); training with the eager step (--compile yes makes this an error)",
              file=sys.stderr)

    start = time.perf_counter()
    progress = Progress(args.steps)
    try:
        run = training.train(
            ds, steps=args.steps, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
            lr_decay_step=args.lr_decay_step, optimizer=args.optimizer, backward=args.backward,
            verify_every=args.verify_every, seed=args.seed, device=device, compile=args.compile,
            eval_every=max(1, args.steps // 20) if draw else 0, on_compile_error=compile_failed,
            progress=progress,
        )
    except GradientDrift as e:
        print(f"backprop train: {e}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    result = {f"{k}_loss": model.evaluate(run.model, *(t.to(device) for t in ds.splits[k]))
              for k in data.SPLITS}
    result |= {"steps": args.steps, "seconds": round(seconds, 2), "backward": args.backward,
               "optimizer": args.optimizer, "compiled": run.compiled, "checks": run.checks,
               "samples": model.sample(run.model, 20)}
    how = f"{args.backward} backward, {args.optimizer}" + (", compiled step" if run.compiled else "")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if draw:
            name = getattr(args.data, "name", str(args.data))
            plot.loss_curve(args.out / "loss.png", run.losses, run.val_losses,
                            f"backprop train on {name}: hidden {args.hidden}, batch {args.batch_size}, "
                            f"lr {args.lr:g}, {how}")
        (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        torch.save(run.model.state(), args.out / "model.pt")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"trained {args.steps} steps in {seconds:.1f} s ({how})")
    if args.verify_every and args.backward == "manual":
        print(f"gradient checks against autograd: {run.checks} passed (every {args.verify_every} steps)")
    print(f"loss  train {result['train_loss']:.4f}  val {result['val_loss']:.4f}  "
          f"test {result['test_loss']:.4f}")
    print("samples: " + " ".join(result["samples"]))
    if args.out is not None:
        written = [args.out / f for f in ("loss.png", "summary.json", "model.pt") if draw or f != "loss.png"]
        print(f"wrote {', '.join(map(str, written))}")
    return 0


def sample(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {str(args.checkpoint)!r} does not exist (write one with train --out DIR)")
    try:
        state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")
        trained = model.Model.from_state(state)
    except Exception as e:  # a corrupt or foreign file: report it, do not trace back
        parser.error(f"--checkpoint {str(args.checkpoint)!r} is not a backprop checkpoint: {e}")
    for word in model.sample(trained, args.n, seed=args.seed):
        print(word)
    return 0
