"""Each op's small cases: a few tiny seeded (args, options), one per option branch, for the checks
that difference or trace every entry (gradgradcheck, opcheck, vmap, jacrev/jacfwd in
tests/test_dropin.py). ``OpInfo.small_cases(seed, dtype)`` of the op table points here, as
``OpInfo.cases`` points into ``strategies``; the same ``k``-th case under every seed has the same
shapes and options, with other values (vmap stacks case k over seeds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backprop.testing.strategies import Case

Draw = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]


def _draw(seed: int, dtype: torch.dtype) -> Draw:
    g = torch.Generator().manual_seed(seed)
    return (lambda *s: torch.randn(*s, generator=g, dtype=dtype),
            lambda hi, *s: torch.randint(0, hi, s, generator=g))


def cross_entropy(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Case]:
    r, i = _draw(seed, dtype)
    return [
        ((r(6, 5), torch.tensor([0, 4, -100, 2, 2, 1])), {"label_smoothing": 0.1}),
        ((r(7, 4) * 3, i(4, 7)), {"reduction": "none"}),
        ((r(5, 3), i(3, 5)), {"reduction": "sum", "label_smoothing": 0.3}),
        ((r(3, 4, 5), i(4, 3, 5)), {"weight": r(4).abs(), "label_smoothing": 0.2}),
        ((r(4, 5), r(4, 5).softmax(1)), {"weight": r(5).abs(), "label_smoothing": 0.1}),
        ((r(5), i(5)), {"reduction": "none"}),
    ]


def logsumexp(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Case]:
    r, _ = _draw(seed, dtype)
    return [((r(3, 4, 5),), {"dim": (0, 2)}), ((r(4, 6),), {"dim": 1, "keepdim": True})]


def batch_norm(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Case]:
    r, _ = _draw(seed, dtype)
    return [
        ((r(8, 3), r(3), r(3)), {"correction": 1}),
        ((r(6, 4) + 2, r(4), r(4)), {}),
        ((r(5, 2),), {"eps": 1e-3}),
        ((r(4, 3, 5), r(3), r(3)), {"running_mean": r(3), "running_var": r(3).abs() + 0.5, "training": False}),
        ((r(5, 2, 3, 2), r(2), r(2)), {"running_mean": r(2), "running_var": r(2).abs() + 0.5,
                                        "momentum": None, "num_batches_tracked": 2, "correction": 1}),
    ]


def tanh(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Case]:
    r, _ = _draw(seed, dtype)
    return [((r(4, 5) * 2,), {})]


def linear(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Case]:
    r, _ = _draw(seed, dtype)
    return [((r(2, 3, 4), r(5, 4), r(5)), {}), ((r(6, 4), r(3, 4)), {})]


def embedding(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Case]:
    r, i = _draw(seed, dtype)
    return [((i(5, 2, 3), r(5, 3)), {"padding_idx": 0}), ((i(4, 7), r(4, 2)), {})]


def linear_cross_entropy(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Case]:
    # small: gradgradcheck differences every entry, and each call is a loop over chunks
    r, i = _draw(seed, dtype)
    return [
        ((r(5, 3), r(4, 3), torch.tensor([0, 3, -100, 2, 1]), r(4)), {"label_smoothing": 0.1, "chunk_size": 3}),
        ((r(5, 2) * 3, r(4, 2), i(4, 5)), {"reduction": "none", "chunk_size": 2}),
        ((r(4, 2), r(5, 2), i(5, 4), r(5)), {"reduction": "sum", "weight": r(5).abs() + 0.5,
                                             "label_smoothing": 0.3, "chunk_size": 3}),
    ]
