"""The ``backprop`` command: the makemore backprop-ninja notebook as a program.

    backprop check    the gradient table: every atom by hand against autograd, then the fused kernels
    backprop train    train the MLP with manual gradients, calibrate BatchNorm, evaluate, sample
    backprop sample   sample names from a trained checkpoint
    backprop bench    time every kernel against autograd, write the report and the chart
    backprop grade    grade a learner's backprop-ninja solution (a .py file or an .ipynb notebook)
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from pathlib import Path

from backprop.makemore import step, train
from backprop.makemore.data import SPLIT_SEED
from backprop.makemore.model import INIT_SEED

DTYPES = ("float32", "float64")


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
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def seed_int(text: str) -> int:
    """What torch.Generator.manual_seed takes: -2**63 <= seed < 2**64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**64), got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, not the usage block (--help has it)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def out_dir(parser: argparse.ArgumentParser, out: Path, holds: str) -> None:
    """--out as a directory, created if need be; a file there or a directory that cannot be made
    is a parser error (exit 2, one line). ``holds`` names what goes in it, for the message."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} is a file (expected a directory for {holds})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {str(out)!r}: cannot create the directory ({e.strerror or e})")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _data_options(p: argparse.ArgumentParser, hidden: int) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="word list, one word per line (default: the shipped names.txt, 29,910 names)")
    p.add_argument("--split-seed", type=int, default=SPLIT_SEED, help="random.seed for the 80/10/10 split")
    p.add_argument("--hidden", type=positive_int, default=hidden, help="hidden units")
    p.add_argument("--batch-size", type=batch_size_int, default=32, help="rows per batch (at least 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to compute")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="backprop", description=__doc__.split("\n\n")[0],
                                     formatter_class=_Help, epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_Help)

    check = command("check", "the notebook's gradient table against autograd")
    _data_options(check, hidden=64)
    check.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the parameters")
    check.add_argument("--seed", type=seed_int, default=INIT_SEED,
                       help="generator seed for the init and the batch")

    tr = command("train", "train with manual gradients, then evaluate and sample")
    _data_options(tr, hidden=200)
    tr.add_argument("--steps", type=positive_int, default=200_000, help="training steps")
    tr.add_argument("--lr", type=positive_float, default=0.1, help="learning rate")
    tr.add_argument("--lr-decay-step", type=non_negative_int, default=100_000,
                    help="step from which the learning rate is lr/10")
    tr.add_argument("--optimizer", choices=list(step.OPTIMIZERS), default="sgd",
                    help="update rule: " + "; ".join(f"{k}: {o.about}" for k, o in step.OPTIMIZERS.items()))
    tr.add_argument("--backward", choices=list(train.BACKWARDS), default="manual",
                    help="gradients from the hand-written kernels, or from autograd")
    tr.add_argument("--verify-every", type=non_negative_int, default=0, metavar="K",
                    help="check manual gradients against autograd every K steps (0: never)")
    tr.add_argument("--compile", choices=list(train.COMPILE), default="auto",
                    help="run the manual step compiled (built ahead of time on the CPU and cached in "
                         "$BACKPROP_CACHE_DIR, else ~/.cache/backprop; torch.compile on CUDA); auto: yes "
                         f"for --steps >= {train.COMPILE_FROM_STEPS:,} when a C++ compiler is found, since the "
                         "first build costs ~30 s")
    tr.add_argument("--seed", type=seed_int, default=INIT_SEED,
                    help="generator seed for the init and the batches")
    tr.add_argument("--out", type=Path, default=None,
                    help="write loss.png, summary.json and model.pt to this directory (default: none)")

    sample = command("sample", "sample names from a checkpoint written by train --out")
    sample.add_argument("--checkpoint", type=Path, required=True, help="model.pt written by train --out")
    sample.add_argument("-n", type=positive_int, default=20, help="how many names")
    sample.add_argument("--seed", type=seed_int, default=INIT_SEED + 10, help="generator seed for the draws")

    from backprop.cli.bench import add_arguments

    add_arguments(command("bench", "time every kernel against torch's fastest path in paired rounds, "
                                   "write the report, the charts and the history"))
    grade = command("grade", "grade a backprop-ninja solution: every d<name> against autograd and float64")
    grade.add_argument("solution", help="the learner's .py file or .ipynb notebook")
    return parser


EXIT_CODES = """exit codes: 0 success; 1 failed checks or a failed run (diverged, a write that
failed, a build that failed); 2 bad input (options, files, sizes); 130 interrupted (Ctrl-C); 141
the reader of stdout went away (a closed pipe), as for a process killed by SIGPIPE"""


def _say(line: str) -> None:
    try:
        print(f"backprop: {line}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr itself is gone: nothing left to tell
        pass


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """The command line, with every failure as one line on stderr and an exit code (EXIT_CODES);
    BACKPROP_TRACEBACK=1 lets an unexpected error's traceback through."""
    for name in ("stdin", "stdout", "stderr"):  # a closed descriptor (2>&-) leaves None here
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "r" if name == "stdin" else "w"))
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:  # `backprop sample | head -1`: the reader has all it wanted
        _silence_stdout()
        return 141
    except MemoryError:
        _say("out of memory (try a smaller --hidden or --batch-size)")
        return 1
    except OSError as e:
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EIO):  # stdout: /dev/full
            _silence_stdout()
            _say(f"cannot write the output: {e.strerror or e}")
        else:
            _say(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        return 1
    except Exception as e:
        if os.environ.get("BACKPROP_TRACEBACK"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        _say(f"unexpected error: {type(e).__name__}: {first} (BACKPROP_TRACEBACK=1 shows where)")
        return 1


def _main(argv: list[str] | None) -> int:
    from backprop.cli import bench, commands

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "grade":  # the grader owns its own command line (exit 0 / 1 / 2)
        from backprop.exercise import cli_main

        return cli_main([args.solution])
    parser.prog = f"backprop {args.command}"  # the commands' errors name the command
    run = {"check": commands.check, "train": commands.train, "sample": commands.sample,
           "bench": bench.bench}[args.command]
    return run(parser, args)


if __name__ == "__main__":
    sys.exit(main())
