"""The op table: every op once, with everything the tests, benchmarks and scripts need to know
about it (PyTorch's ``OpInfo`` / ``op_db`` is the model).

    for info in OP_DB:
        info.module, info.reference, info.cases(), info.fixed_cases("cpu"), info.small_cases(), ...

Tests, benchmarks, the benchmark report, the mutation score and .ci/gpu iterate ``OP_DB``; none
keeps its own list of ops. ``OP_DB`` covers exactly ``backprop.OPS`` (the library's list, which
does not import the harness); tests/test_op_table.py checks that, and that each op has its test
and benchmark files. Adding an op: ``backprop/<op>.py``, an entry in ``backprop.OPS``,
``tests/test_<op>.py``, ``benchmarks/bench_<op>.py``, one ``OpInfo`` below and its small cases
(``small_cases.<op>``).

Needs hypothesis (the ``cases`` strategies), as ``backprop.testing.strategies`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from hypothesis import strategies as st

import backprop
from backprop.testing import references, small_cases, strategies
from backprop.testing.strategies import Case

# (shape regex, mode, contender, baseline, threshold, what): one speed target of benchmarks/report.py
Target = tuple[str, str, str, str, float, str]

ROOT = Path(__file__).resolve().parents[2]  # the checkout (tests/ and benchmarks/ are not installed)


def float64_inputs(case: Case) -> Case:
    """The case with its floating-point tensors in float64: what finite differences need."""
    args, options = case
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args), options


@dataclass(frozen=True)
class OpInfo:
    name: str  # backprop.<name>, tests/test_<name>.py, benchmarks/bench_<name>.py
    reference: Callable[..., torch.Tensor]  # the torch twin, with the op's exact signature
    cases: Callable[..., st.SearchStrategy[Case]]  # cases(dtype=None): hypothesis draws a Case
    fixed_cases: Callable[[str], list[Case]]  # seeded, on a device: notebook scale, then other sizes/options
    # label -> (sizes, "small" | "large" | "xl" | "gpu"): the shapes benchmarks/bench_<name>.py times;
    # "xl", larger CPU shapes and option variants of a large one, only in `backprop bench --full`
    benchmark_shapes: Mapping[str, tuple[tuple[Any, ...], str]]
    # where the formula cancels internally, the size of its terms for the rounding floor:
    # magnitude(*args64, dout=dout64, **options) -> {"out": ..., "d<arg>": ...} (see compare.py)
    magnitude: Callable[..., dict[str, torch.Tensor]] | None = None
    # the case made fit for finite differences (float64, narrowed); None: nothing to difference
    gradcheck_inputs: Callable[[Case], Case | None] = float64_inputs
    # the case narrowed for the second-order stage, whose reference is the twin's double backward
    second_order_inputs: Callable[[Case], Case] = lambda case: case
    speed_targets: tuple[Target, ...] = field(default=())  # benchmarks/report.py's; every op has FASTEST
    # benchmarks/report.py's memory targets, in Target's form: the contender's extra peak at most
    # threshold times the baseline's (the memory pass's peak_bytes)
    memory_targets: tuple[Target, ...] = field(default=())
    # contenders beyond benchmarks/conftest.py's VARIANTS that this op's benchmark runs ("adapter":
    # backprop.autograd.apply under autograd, where that path differs from the kernel's)
    bench_variants: tuple[str, ...] = field(default=())
    # options out of range or of the wrong type, for the bad-input fuzz (backprop.testing.fuzz)
    bad_options: st.SearchStrategy[dict] = field(default=st.just({}))

    @property
    def small_cases(self) -> Callable[..., list[Case]]:
        """small_cases(seed=0, dtype=float64): tiny cases, one per option branch (small_cases.py)."""
        return getattr(small_cases, self.name)

    @property
    def module(self) -> ModuleType:
        return backprop.OPS[self.name]

    @property
    def test_file(self) -> Path:
        return ROOT / "tests" / f"test_{self.name}.py"

    @property
    def bench_file(self) -> Path:
        return ROOT / "benchmarks" / f"bench_{self.name}.py"

    @property
    def large_shape(self) -> str:
        """The label of the first large benchmark shape: the op's headline, and the top of its size sweep."""
        return next(label for label, (_, size) in self.benchmark_shapes.items() if size == "large")


def _rng(device: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """Seeded randn(*shape) and randint(high, *shape), drawn on the CPU and moved to device."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    def randint(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=g).to(device)

    return randn, randint


# ---------------------------------------------------------------- cross_entropy


def _cross_entropy_fixed(device: str) -> list[Case]:
    randn, randint = _rng(device)
    first = (randn(32, 27), randint(27, 32))
    targets = randint(27, 48)
    targets[::5] = -100
    kdim_targets = randint(5, 4, 3, 2)
    kdim_targets[0, 1] = -100
    return [(first, {}), ((randn(48, 27) * 30, targets), {"label_smoothing": 0.1}),
            ((randn(4, 5, 3, 2), kdim_targets), {"weight": randn(5).abs(), "label_smoothing": 0.2}),
            ((randn(6, 7), randn(6, 7).softmax(1)), {"weight": randn(7).abs(), "reduction": "sum"})]


def _cross_entropy_gradcheck(case: Case) -> Case | None:
    (logits, targets), options = float64_inputs(case)
    kept = targets != options.get("ignore_index", -100)
    if options.get("reduction", "mean") == "mean" and not kept.any():
        return None  # the mean over zero kept rows is nan everywhere: nothing to difference
    # differences of a loss of size |f| carry noise ~1e-16 |f| / h; at logits of 1e4 that
    # exceeds gradcheck's atol. The 1e4 regime is checked against float64 autograd instead.
    return (logits / max(1.0, float(logits.abs().max()) / 10), targets), options


# ---------------------------------------------------------------- logsumexp


def _logsumexp_fixed(device: str) -> list[Case]:
    randn, _ = _rng(device)
    return [((randn(32, 27),), {"dim": 1}), ((randn(5, 7, 9) * 50,), {"dim": (0, 2), "keepdim": True})]


def _logsumexp_gradcheck(case: Case) -> Case | None:
    (x,), options = float64_inputs(case)
    if x.numel() == 0:
        return None  # an empty x (a reduction over an empty dim gives -inf): nothing to difference
    return (torch.where(x.isinf(), -30.0, x),), options  # differences need finite inputs


# ---------------------------------------------------------------- batch_norm, tanh, linear


def _batch_norm_fixed(device: str) -> list[Case]:
    randn, _ = _rng(device)
    return [((randn(32, 200), randn(200), randn(200)), {"correction": 1}),
            ((randn(17, 64) + 40, randn(64), None), {}),
            ((randn(4, 6, 5, 3), randn(6), randn(6)),
             {"running_mean": randn(6), "running_var": randn(6).abs() + 0.5}),
            ((randn(5, 6, 7), randn(6), randn(6)),
             {"running_mean": randn(6), "running_var": randn(6).abs() + 0.5, "training": False})]


def _tanh_fixed(device: str) -> list[Case]:
    randn, _ = _rng(device)
    return [((randn(32, 200),), {}), ((randn(3, 5, 7) * 4,), {})]


def _linear_fixed(device: str) -> list[Case]:
    randn, _ = _rng(device)
    return [((randn(32, 30), randn(200, 30), randn(200)), {}), ((randn(2, 9, 16), randn(8, 16), None), {})]


# ---------------------------------------------------------------- embedding


def _embedding_fixed(device: str) -> list[Case]:
    randn, randint = _rng(device)
    first = (randint(27, 32, 3), randn(27, 10))
    return [(first, {}), ((randint(5, 4, 50), randn(11, 6)), {"padding_idx": 2, "deterministic": True}),
            ((randint(7, 6, 9), randn(8, 5)), {"scale_grad_by_freq": True})]


def _embedding_gradcheck(case: Case) -> Case:
    args, options = float64_inputs(case)
    # the padding row is read in forward but gets no gradient, and scale_grad_by_freq divides the
    # gradient by the counts, by F.embedding's definition: finite differences disagree on purpose
    return args, {**options, "padding_idx": None, "scale_grad_by_freq": False}


def _embedding_second_order(case: Case) -> Case:
    # torch's double backward of F.embedding ignores scale_grad_by_freq (its
    # embedding_dense_double_backward takes no counts): d<dweight, v>/ddout comes out undivided,
    # where the gradient it differentiates is divided. Ours divides (tests/test_dropin.py checks it
    # by hand); the twin is the reference without it
    args, options = case
    return args, {**options, "scale_grad_by_freq": False}


# ---------------------------------------------------------------- linear_cross_entropy


def _linear_cross_entropy_fixed(device: str) -> list[Case]:
    randn, randint = _rng(device)
    first = (randn(32, 200), randn(27, 200) * 0.1, randint(27, 32), randn(27))  # the notebook's head
    targets = randint(27, 48)
    targets[::5] = -100
    weight = randn(27).abs() + 0.5
    return [(first, {}),
            ((randn(48, 16) * 3, randn(27, 16), targets, None),
             {"weight": weight, "label_smoothing": 0.1, "chunk_size": 20})]  # 3 chunks, an uneven tail


def _linear_cross_entropy_gradcheck(case: Case) -> Case | None:
    args, options = float64_inputs(case)
    x, linear_weight, targets, linear_bias = args
    weight = options.get("weight")
    options = {**options, "weight": None if weight is None else weight.double()}
    # as for cross_entropy: logits of 1e3 make the loss's finite-difference noise exceed atol
    x = x / max(1.0, float(x.abs().max()) / 10)
    # at most 6 rows and 4 features (chunk boundaries kept): gradcheck differences every input,
    # and each forward of a scalar loss also computes the gradients, chunk by chunk
    x, linear_weight, targets = x[:6, :4], linear_weight[:, :4], targets[:6]
    if options.get("reduction", "mean") == "mean" and not (targets != options.get("ignore_index", -100)).any():
        return None  # the mean over zero kept rows is nan everywhere: nothing to difference
    return (x, linear_weight, targets, linear_bias), options


# ---------------------------------------------------------------- the table

# issue 16's bar, every op: our best public path (the fastest of manual, manual-compiled and
# manual-cpp, backprop.cpp: at the notebook's scale, and at the large shapes for batch_norm) at
# least as fast as torch's fastest (autograd, autograd-compiled or native: "torch"), same run,
# at the large (and xl) shapes and at the notebook's scale, fwd+bwd and backward alone
FASTEST: tuple[Target, ...] = tuple(
    (f"^{size}", mode, "best", "torch", 1.0, f"best >= 1x torch fastest ({size}, {mode})")
    for size in ("large", "xl", "notebook") for mode in ("fwd+bwd", "bwd"))
# backward of the memory-bound ops against a copy of the bytes it must move, same run
BANDWIDTH: tuple[Target, ...] = (
    ("^(large|xl)", "bwd", "best", "copy", 0.7, "backward >= 70% of copy bandwidth"),
    ("gpu", "bwd", "best", "copy", 0.8, "GPU backward >= 80% of copy (HBM) bandwidth"),
)

# issue 16 on CUDA: against Liger-Kernel's Triton kernels too, where its wheel is installed
LIGER: Target = ("gpu", "fwd+bwd", "best", "liger", 1.0, "best >= 1x Liger-Kernel (CUDA)")

# options of the wrong type (a bool for an int, a str for a bool, None) are drawn too: accepted,
# they would act as another value (ignore_index=True as class 1, keepdim="no" as True)
WRONG_TYPES = [True, 1.0, None, "1"]

OP_DB: tuple[OpInfo, ...] = (
    OpInfo(
        "cross_entropy", references.cross_entropy, strategies.cross_entropy_cases, _cross_entropy_fixed,
        # (logits' shape, with class weights?): the K-dim case moves the 2-D large case's bytes
        {"notebook 32x27": (((32, 27), False), "small"), "large 2048x32768": (((2048, 32768), False), "large"),
         "xl 8192x32768": (((8192, 32768), False), "xl"),
         "xl 8192x32768 weight": (((8192, 32768), True), "xl"),
         "xl 8x32768x1024 d1": (((8, 32768, 1024), False), "xl"),
         "gpu 16384x65536": (((16384, 65536), False), "gpu")},
        magnitude=references.cross_entropy_magnitude,
        gradcheck_inputs=_cross_entropy_gradcheck,
        bench_variants=("liger",),
        speed_targets=(LIGER,
            ("^(large|xl) [0-9]+x32768$",
             "fwd+bwd", "best", "autograd", 3.0, "best path >= 3x F.cross_entropy"),
            ("^(large|xl) [0-9]+x32768$",
             "fwd+bwd", "manual", "autograd", 1.3, "eager >= 1.3x F.cross_entropy"),
            *FASTEST, *BANDWIDTH),
        bad_options=st.fixed_dictionaries({}, optional={
            "reduction": st.sampled_from(["mean", "sum", "none", "avg", None]),
            "ignore_index": st.one_of(st.integers(-101, 5), st.sampled_from([*WRONG_TYPES, 1.5, 2**70])),
            "label_smoothing": st.sampled_from([0.0, 0.2, 1.0, -0.1, 1.5, float("nan"), *WRONG_TYPES]),
        }),
    ),
    OpInfo(
        "logsumexp", references.logsumexp, strategies.logsumexp_cases, _logsumexp_fixed,
        {"notebook 32x27": ((32, 27), "small"), "large 2048x32768": ((2048, 32768), "large"),
         "xl 8192x32768": ((8192, 32768), "xl")},
        gradcheck_inputs=_logsumexp_gradcheck,
        speed_targets=(("^(large|xl)", "fwd+bwd", "best", "autograd", 1.5, ">= 1.5x torch.logsumexp"),
                       *FASTEST, *BANDWIDTH),
        bad_options=st.fixed_dictionaries({}, optional={
            "dim": st.one_of(st.integers(-4, 4),
                             st.lists(st.integers(-3, 3), min_size=1, max_size=3).map(tuple)),
            "keepdim": st.one_of(st.booleans(), st.sampled_from(["no", 1, None])),
        }),
    ),
    OpInfo(
        "batch_norm", references.batch_norm, strategies.batch_norm_cases, _batch_norm_fixed,
        {"notebook 32x64": ((32, 64), "small"), "large 4096x1024": ((4096, 1024), "large"),
         "large NCHW 32x64x56x56": ((32, 64, 56, 56), "large"),
         "gpu 65536x1024": ((65536, 1024), "gpu")},
        magnitude=references.batch_norm_magnitude,
        speed_targets=(("large.*correction=1", "fwd+bwd", "best", "autograd", 2.0, ">= 2x composed ops"),
                       *FASTEST, *BANDWIDTH),
        bad_options=st.fixed_dictionaries({}, optional={
            "eps": st.sampled_from([1e-5, 0.0, -1.0, float("inf"), True, None, "1e-5"]),
            "correction": st.sampled_from([0, 1, 2, -1, 1.0]),
        }),
    ),
    OpInfo(
        "tanh", references.tanh, strategies.tanh_cases, _tanh_fixed,
        {"notebook 32x200": ((32, 200), "small"), "large 16M": ((4096, 4096), "large"),
         "gpu 256M": ((16384, 16384), "gpu")},
        speed_targets=(*FASTEST, *BANDWIDTH),
    ),
    OpInfo(
        "linear", references.linear, strategies.linear_cases, _linear_fixed,
        {"notebook 32x30->200": ((32, 30, 200), "small"),
         "large 4096x1024->1024": ((4096, 1024, 1024), "large")},
        speed_targets=FASTEST,
    ),
    OpInfo(
        "embedding", references.embedding, strategies.embedding_cases, _embedding_fixed,
        {"notebook V=27 E=10 32x3": ((27, 10, (32, 3)), "small"),
         "large V=50257 E=768 8x1024": ((50257, 768, (8, 1024)), "large")},
        gradcheck_inputs=_embedding_gradcheck,
        second_order_inputs=_embedding_second_order,
        speed_targets=FASTEST,
        bad_options=st.fixed_dictionaries({}, optional={
            "padding_idx": st.one_of(st.integers(-6, 6), st.sampled_from([True, 1.0, "1"])),
        }),
    ),
    OpInfo(
        "linear_cross_entropy", references.linear_cross_entropy, strategies.linear_cross_entropy_cases,
        _linear_cross_entropy_fixed,
        {"notebook 32x200->27": ((32, 200, 27), "small"),
         "large 2048x512->32768": ((2048, 512, 32768), "large"),
         "gpu 8192x4096->128256 bf16": ((8192, 4096, 128256), "gpu")},  # bfloat16: bench_linear_cross_entropy
        magnitude=references.linear_cross_entropy_magnitude,
        gradcheck_inputs=_linear_cross_entropy_gradcheck,
        speed_targets=(("large", "fwd+bwd", "manual", "autograd", 1.0, ">= 1x F.linear + F.cross_entropy"),
                       ("large", "fwd+bwd", "manual", "native", 1.0, ">= 1x chunked F.linear_cross_entropy"),
                       ("large", "fwd+bwd", "adapter", "autograd", 1.0,
                        "adapter path >= 1x F.linear + F.cross_entropy"),
                       ("large", "fwd+bwd", "adapter", "native", 1.0,
                        "adapter path >= 1x chunked F.linear_cross_entropy"),
                       LIGER, *FASTEST),
        # under autograd the adapter hands the cached gradients over (docs/linear_cross_entropy.md)
        memory_targets=(("large", "fwd+bwd", "adapter", "autograd", 0.25,
                         "adapter path's extra peak <= 1/4 of F.linear + F.cross_entropy's"),
                        ("large", "fwd+bwd", "manual", "autograd", 0.25,
                         "kernel path's extra peak <= 1/4 of F.linear + F.cross_entropy's")),
        bench_variants=("adapter", "liger"),
        bad_options=st.fixed_dictionaries({}, optional={
            "reduction": st.sampled_from(["mean", "sum", "none", "avg", None]),
            "ignore_index": st.one_of(st.integers(-101, 5), st.sampled_from([*WRONG_TYPES, 1.5, 2**70])),
            "label_smoothing": st.sampled_from([0.0, 0.2, 1.0, -0.1, 1.5, float("nan"), *WRONG_TYPES]),
            "chunk_size": st.sampled_from([None, 1, 2, 0, -1, 2.0, True, "2"]),
        }),
    ),
)

OPS: dict[str, OpInfo] = {info.name: info for info in OP_DB}
