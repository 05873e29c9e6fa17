"""backprop check, train and sample: argparse's namespace in, the makemore package's calls, the
report out (a table, or one JSON object with --json)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from backprop.cli import out_dir, plot
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


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_memory(parser: argparse.ArgumentParser, args: argparse.Namespace, ds: data.Dataset,
                  device: torch.device, itemsize: int, training: bool) -> None:
    """Refuse sizes that cannot be allocated before allocating them: a rough count of the
    tensors (parameters, gradients and optimizer state; one batch's activations; the whole
    training split's hidden layer and logits when BatchNorm is calibrated and the loss evaluated)."""
    V, H, B = ds.vocab.size, args.hidden, args.batch_size
    T = data.BLOCK_SIZE * model.N_EMBD
    params = V * model.N_EMBD + T * H + H + H * V + V + 2 * H
    n = int(ds.splits["train"][0].shape[0]) if training else 0
    need = itemsize * (params * 4 + B * (T + 12 * H + 8 * V) + 3 * n * (H + V))
    have = _memory_bytes(device)
    if need > have:
        parser.error(f"--hidden {H} with --batch-size {B} needs about {need / 2**30:,.1f} GiB, more than "
                     f"the {have / 2**30:,.1f} GiB of memory on {device.type}")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    device = _device(parser, args.device)
    ds = _dataset(parser, args)
    _check_memory(parser, args, ds, device, DTYPES[args.dtype].itemsize, training=False)
    params, Xb, Yb = notebook.first_batch(ds, args.hidden, batch_size=args.batch_size, seed=args.seed,
                                          dtype=DTYPES[args.dtype], device=device)
    loss, rows = notebook.gradient_table(params, Xb, Yb)
    summary = ds.summary() | {"parameters": model.count_params(params), "loss": loss}
    ok = all(r.passed for r in rows)
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
                  f"| maxdiff: {r.maxdiff:.3g} | float64 error {r.error:.3g} (torch {r.torch_error:.3g})"
                  f" {'ok' if r.passed else 'FAIL'}")
    exact = sum(r.exact for r in rows[:n1])
    print(f"\n{exact}/{n1} exercise-1 rows bit-exact; "
          f"{sum(not r.approximate for r in rows)} rows outside torch.allclose (information only)")
    print(f"verdict: {'all' if ok else 'NOT all'} rows pass ({notebook.ACCEPTANCE})")
    return 0 if ok else 1


OUTPUTS = ("model.pt", "summary.json", "loss.png")  # in the order written: the model first


def _check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """Find a bad --out before training, not after: create it and try writing in it."""
    out_dir(parser, out, ", ".join(OUTPUTS))
    for name in OUTPUTS:
        if (out / name).is_dir():
            parser.error(f"--out {str(out)!r}: {name} there is a directory, where the file would go")
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        parser.error(f"--out {str(out)!r} is not writable ({e.strerror or e})")


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    """write(file) into a temporary file next to path, then rename it over path: a reader, a full
    disk or a kill never leaves half a file where a whole one was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the outputs get the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_outputs(out: Path, state: dict, result: dict, curve) -> list[Path]:
    written = []
    writers = {"model.pt": lambda f: torch.save(state, f),
               "summary.json": lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()),
               "loss.png": curve}
    for name in OUTPUTS:
        if writers[name] is not None:
            _atomic(out / name, writers[name])
            written.append(out / name)
    return written


def _finite(x):
    """JSON has no NaN or infinity: null in their place."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    device = _device(parser, args.device)
    if args.compile == "yes" and args.backward != "manual":
        parser.error("--compile yes applies to --backward manual only")
    ds = _dataset(parser, args)
    dtype = torch.float32
    _check_memory(parser, args, ds, device, dtype.itemsize, training=True)
    if args.out is not None:
        _check_out(parser, args.out)
    draw = args.out is not None and plot.available()
    if args.out is not None and not draw:
        print(f"backprop train: {plot.MISSING}; writing {args.out} without loss.png", file=sys.stderr)

    def note(line: str) -> None:
        print(f"backprop train: {line}", file=sys.stderr, flush=True)

    def compile_failed(e: Exception) -> None:  # --compile auto: say so; train goes on eager
        note(f"building the compiled step failed ({type(e).__name__}: {training.first_line(e)}); "
             "training with the eager step (--compile yes makes this an error)")

    progress = Progress(args.steps)
    try:
        run = training.train(
            ds, steps=args.steps, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
            lr_decay_step=args.lr_decay_step, optimizer=args.optimizer, backward=args.backward,
            verify_every=args.verify_every, seed=args.seed, device=device, dtype=dtype,
            compile=args.compile, eval_every=max(1, args.steps // 20) if draw else 0,
            on_compile_error=compile_failed, progress=progress, on_note=note,
        )
    except GradientDrift as e:
        note(str(e))
        return 1
    except training.CompilerMissing as e:
        note(str(e))
        return 2
    except training.CompileFailed as e:
        note(str(e))
        return 1
    finally:
        progress.close()
    result = {f"{k}_loss": model.evaluate(run.model, *(t.to(device) for t in ds.splits[k]))
              for k in data.SPLITS}
    result |= {"steps": args.steps, "steps_done": run.steps_done, "seconds": round(run.seconds, 2),
               "backward": args.backward, "optimizer": args.optimizer, "compiled": run.compiled,
               "checks": run.checks, "stopped": run.stopped or None,
               # no sampling from a model whose parameters are not finite
               "samples": [] if run.stopped else model.sample(run.model, 20)}
    result = _finite(result)
    how = f"{args.backward} backward, {args.optimizer}" + (", compiled step" if run.compiled else "")
    written: list[Path] = []
    if args.out is not None:
        title = (f"backprop train on {getattr(args.data, 'name', str(args.data))}: hidden {args.hidden}, "
                 f"batch {args.batch_size}, lr {args.lr:g}, {how}"
                 + (f" ({run.stopped})" if run.stopped else ""))
        curve = (lambda f: plot.loss_curve(f, run.losses, run.val_losses, title)) if draw else None
        state = run.model.state() | ({"stopped": run.stopped} if run.stopped else {})
        try:
            written = _write_outputs(args.out, state, result, curve)
        except Exception as e:  # a full disk, a directory gone read-only: keep the work
            reason = f"{type(e).__name__}: {e.strerror}" if isinstance(e, OSError) else training.first_line(e)
            try:
                rescue = Path(tempfile.mkdtemp(prefix="backprop-train-"))
                _write_outputs(rescue, state, result, curve)
            except Exception as e2:
                r2 = e2.strerror if isinstance(e2, OSError) else training.first_line(e2)
                note(f"writing {args.out} failed ({reason}); writing to a temporary directory failed "
                     f"too ({r2}): the trained model is not saved")
                return 1
            note(f"writing {args.out} failed ({reason}); the run is saved in {rescue} instead")
            return 1
    if run.interrupted:
        saved = f"; wrote the {run.steps_done} steps done to {args.out}, marked interrupted" if written else ""
        note(f"{run.stopped}{saved}")
        return 130
    if run.diverged:
        saved = f"; wrote {args.out}, marked diverged" if written else ""
        note(f"{run.stopped}; training stopped, no samples drawn (try a smaller --lr){saved}")
        if args.json:
            print(json.dumps(result))
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    rate = run.steps_done / run.seconds if run.seconds > 0 else float("inf")
    print(f"trained {args.steps} steps in {run.seconds:.1f} s ({rate:,.0f} steps/s; {how})")
    if args.verify_every and args.backward == "manual":
        print(f"gradient checks against autograd: {run.checks} passed (every {args.verify_every} steps)")
    print(f"loss  train {result['train_loss']:.4f}  val {result['val_loss']:.4f}  "
          f"test {result['test_loss']:.4f}")
    print("samples: " + " ".join(result["samples"]))
    if written:
        print(f"wrote {', '.join(map(str, written))}")
    return 0


def load_error(e: Exception) -> str:
    """What torch.load found wrong, in a line: for a weights-only load, the unpickler's own reason
    ("Unsupported operand 123", "Unsupported global: ..."), not torch's advice to load the file with
    weights_only=False, which would run any code a foreign file holds."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    return training.first_line(Exception(found.group(1))) if found else training.first_line(e)


def sample(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    where = f"--checkpoint {str(args.checkpoint)!r}"
    if args.checkpoint.is_dir():
        parser.error(f"{where} is a directory (expected the model.pt in it, written by train --out)")
    if not args.checkpoint.is_file():
        parser.error(f"{where} does not exist (write one with train --out DIR)")
    try:
        state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")
    except OSError as e:
        parser.error(f"{where} cannot be read ({e.strerror or e})")
    except Exception as e:  # a corrupt or foreign file: report it, do not trace back
        parser.error(f"{where} is not a backprop checkpoint (expected a model.pt written by train --out): "
                     f"{load_error(e)}")
    try:
        trained = model.Model.from_state(state)
    except ValueError as e:
        parser.error(f"{where} is not a usable backprop checkpoint: {e}")
    for word in model.sample(trained, args.n, seed=args.seed):
        print(word)
    return 0
