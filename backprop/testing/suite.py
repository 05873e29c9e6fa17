"""The suite's check of one drawn case, shared by the kernel tests and the mutant catalogue, so
that a mutant meets exactly the checks a real kernel does.

    check_case("batch_norm", backprop.batch_norm, case)     # oracle against autograd + float64
    gradcheck_case("batch_norm", backprop.batch_norm, case) # finite differences, float64
"""

from __future__ import annotations

from types import ModuleType

import torch

from backprop.testing.oracle import check_against_autograd, check_gradcheck
from backprop.testing.references import REFERENCES, batch_norm_magnitude, cross_entropy_magnitude

# formulas that cancel internally name the size of their terms for the rounding floor
MAGNITUDES = {"cross_entropy": cross_entropy_magnitude, "batch_norm": batch_norm_magnitude}


def check_case(name: str, op: ModuleType, case: tuple) -> None:
    args, options = case
    check_against_autograd(op, REFERENCES[name], *args, magnitude=MAGNITUDES.get(name), **options)


def gradcheck_inputs(name: str, case: tuple) -> tuple | None:
    """The case in float64, narrowed where finite differences cannot work; None to skip it."""
    args, options = case
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    if name == "cross_entropy":
        logits, targets = args
        kept = targets != options.get("ignore_index", -100)
        if options.get("reduction", "mean") == "mean" and not kept.any():
            return None  # the mean over zero kept rows is nan everywhere: nothing to difference
        # differences of a loss of size |f| carry noise ~1e-16 |f| / h; at logits of 1e4 that
        # exceeds gradcheck's atol. The 1e4 regime is checked against float64 autograd instead.
        args = [logits / max(1.0, float(logits.abs().max()) / 10), targets]
    elif name == "logsumexp":
        args = [torch.where(args[0].isinf(), -30.0, args[0])]  # differences need finite inputs
    elif name == "embedding":
        # the padding row is read in forward but gets no gradient, by F.embedding's definition:
        # finite differences disagree with that on purpose
        options = {**options, "padding_idx": None}
    return args, options


def gradcheck_case(name: str, op: ModuleType, case: tuple) -> bool:
    """Run gradcheck on the case; False where it does not apply (see gradcheck_inputs)."""
    prepared = gradcheck_inputs(name, case)
    if prepared is None:
        return False
    args, options = prepared
    check_gradcheck(op, *args, **options)
    return True
