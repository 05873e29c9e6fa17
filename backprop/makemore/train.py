"""Exercise 4: training with manual gradients. The inputs are validated here, once; the loop
draws the batches and the learning rate and runs one step type (step.Step), eager or compiled;
this module alone decides whether the compiled step runs and falls back when it cannot be built.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from backprop.makemore import aot, model, step
from backprop.makemore.data import Dataset
from backprop.makemore.model import INIT_SEED, Model
from backprop.makemore.step import GradientDrift

# --compile auto builds the step (~30 s the first time, then cached) from this many steps, and
# only when a C++ compiler is found
COMPILE_FROM_STEPS = 50_000
BACKWARDS = ("manual", "autograd")
COMPILE = ("auto", "yes", "no")

__all__ = ["COMPILE_FROM_STEPS", "CompileFailed", "CompilerMissing", "GradientDrift", "Run", "learning_rate",
           "train"]


class CompilerMissing(RuntimeError):
    """compile='yes' on the CPU without a C++ compiler on PATH."""


class CompileFailed(RuntimeError):
    """compile='yes' and the compiled step could not be built or loaded."""


@dataclass
class Run:
    model: Model  # BatchNorm calibrated over the training set
    losses: list[float]  # the training batch's loss at every step
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (steps done, val loss)
    checks: int = 0  # gradient checks against autograd, all passed
    compiled: bool = False  # whether the compiled step ran
    steps_done: int = 0
    stopped: str = ""  # why the run ended early: "diverged: ..." or "interrupted: ..." ("" if it did not)
    seconds: float = 0.0  # the training loop alone (no build, no evaluation)

    @property
    def diverged(self) -> bool:
        return self.stopped.startswith("diverged")

    @property
    def interrupted(self) -> bool:
        return self.stopped.startswith("interrupted")


def learning_rate(step: int, lr: float, decay_step: int) -> float:
    return lr if step < decay_step else lr / 10


def train(dataset: Dataset, *, steps: int = 200_000, hidden: int = 200, batch_size: int = 32,
          lr: float = 0.1, lr_decay_step: int = 100_000, optimizer: str = "sgd",
          backward: str = "manual", verify_every: int = 0, seed: int = INIT_SEED,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, compile: str = "no",
          eval_every: int = 0, on_compile_error: Callable[[Exception], None] | None = None,
          progress: Callable[[int, int, float], None] | None = None,
          on_note: Callable[[str], None] | None = None) -> Run:
    """One generator seeds the init and then draws the batches, as in the seed. verify_every=K
    checks the manual gradients against autograd every K steps (GradientDrift on a mismatch).
    compile: 'yes' runs the manual steps through aot.compiled_step (verified steps stay eager),
    'no' does not, 'auto' does from COMPILE_FROM_STEPS steps when a C++ compiler is found and
    falls back to the eager step if the build fails, telling on_compile_error(exception) (default:
    a warning). eval_every=K records the validation loss every K steps (0: never). progress(done,
    steps, loss) is called with done=0 when the loop starts, then every 100 steps. on_note(line)
    hears about the compiled step (building, its cache, no compiler; default: a warning).

    The run stops early, and says why in Run.stopped, when the loss is not finite (checked every
    100 steps and at the end; the step named is the first non-finite one) or on KeyboardInterrupt
    (the steps done so far are kept)."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be 'manual' or 'autograd', got {backward!r}")
    if compile not in COMPILE:
        raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {compile!r}")
    if compile == "yes" and backward != "manual":
        raise ValueError("compile='yes' applies to the manual backward only, got backward='autograd'")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    for name, value, low in (("steps", steps, 1), ("verify_every", verify_every, 0),
                             ("eval_every", eval_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    g = torch.Generator().manual_seed(seed)
    params = model.init_params(dataset.vocab.size, hidden, generator=g, dtype=dtype, device=device)
    state = step.init_state(optimizer, params)
    Xtr, Ytr = (t.to(device) for t in dataset.splits["train"])
    step.check_inputs(params, state, Xtr, Ytr, batch_size, optimizer=optimizer,
                      names=("training contexts", "training targets"))

    eager = step.eager_step(params, state, Xtr, Ytr, optimizer=optimizer, backward=backward)
    verify = backward == "manual" and verify_every > 0
    if verify:
        verified = step.eager_step(params, state, Xtr, Ytr, optimizer=optimizer, verify_gradients=True)
    if on_note is None:
        def on_note(line: str) -> None:
            warnings.warn(line, stacklevel=3)
    fast = None
    if _wants_compiled(compile, steps, backward, torch.device(device), on_note):
        try:
            fast = aot.compiled_step(params, state, Xtr, Ytr, batch_size, optimizer=optimizer,
                                     check=False, say=on_note)  # checked above
        except Exception as e:  # torch.export / Inductor / the C++ compiler: many kinds
            if compile == "yes":
                raise CompileFailed(f"--compile yes: building the compiled step failed "
                                    f"({type(e).__name__}: {first_line(e)})") from e
            if on_compile_error is None:
                warnings.warn(f"building the compiled step failed ({type(e).__name__}: {first_line(e)}); "
                              "training with the eager step", stacklevel=2)
            else:
                on_compile_error(e)
    run = Run(Model(params, dataset.vocab), [], compiled=fast is not None)
    Xva, Yva = (t.to(device) for t in dataset.splits["val"])
    rate = torch.tensor(lr, dtype=dtype, device=device)  # a graph input: filled, never replaced
    current = lr
    # the losses, read back once at the end, in chunks: --steps may be a huge count
    chunks: list[torch.Tensor] = []
    checked = 0  # steps whose loss is known to be finite
    if progress is not None:
        progress(0, steps, math.nan)
    start, evaluating = time.perf_counter(), 0.0  # the validation curve's time is not training's
    try:
        for i in range(steps):
            ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g).to(device)
            if (r := learning_rate(i, lr, lr_decay_step)) != current:
                rate.fill_(r)
                current = r
            if verify and i % verify_every == 0:
                try:
                    loss = verified(ix, rate)
                except GradientDrift as e:
                    raise GradientDrift(f"step {i}: {e}") from None
                run.checks += 1
            else:
                loss = (fast or eager)(ix, rate)
            if i % _CHUNK == 0:
                chunks.append(torch.empty(min(_CHUNK, steps - i), dtype=dtype, device=device))
            chunks[-1][i % _CHUNK] = loss
            done = i + 1
            run.steps_done = done
            if done % 100 == 0 or done == steps:
                base = (len(chunks) - 1) * _CHUNK  # [checked, done) lies in the last chunk
                recent = chunks[-1][checked - base:done - base]
                bad = (~recent.isfinite()).nonzero()
                if len(bad):  # the first non-finite loss, by step number (1-based, as progress counts)
                    at = checked + int(bad[0]) + 1
                    run.stopped = f"diverged: the loss is {float(recent[int(bad[0])])} at step {at}"
                    run.steps_done = at
                    break
                checked = done
            if eval_every and (done % eval_every == 0 or done == steps):
                t = time.perf_counter()
                run.val_losses.append((done, _calibrated(run.model, Xtr, Xva, Yva)))
                evaluating += time.perf_counter() - t
            if progress is not None and (done % 100 == 0 or done == steps):
                progress(done, steps, float(loss))
    except KeyboardInterrupt:
        run.stopped = f"interrupted: after {run.steps_done} of {steps} steps"
    run.seconds = time.perf_counter() - start - evaluating
    run.model.params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
    model.calibrate(run.model, Xtr)
    run.losses = (torch.cat(chunks).tolist() if chunks else [])[:run.steps_done]
    return run


_CHUNK = 640 * 100  # a multiple of the 100 steps between checks


def _calibrated(m: Model, Xtr: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> float:
    """The loss on (X, Y) with BatchNorm calibrated over the training set at this point."""
    model.calibrate(m, Xtr)
    return model.evaluate(m, X, Y)


def _wants_compiled(compile: str, steps: int, backward: str, device: torch.device,
                    on_note: Callable[[str], None]) -> bool:
    if compile == "no" or backward != "manual" or (compile == "auto" and steps < COMPILE_FROM_STEPS):
        return False
    from backprop import compiled  # imports torch._dynamo (seconds): only when it may compile

    if device.type != "cpu" or compiled.cpu_compiler_found():
        return True
    if compile == "yes":
        raise CompilerMissing("--compile yes: the compiled step needs a C++ compiler, and g++ is not "
                              "on PATH (install g++, or use --compile no)")
    on_note("no C++ compiler (g++) on PATH: training with the slower eager step")
    return False


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
