"""The notebook's forward pass, atom by atom, and torch autograd's gradients of it.

The expressions are the notebook's own, character for character where it matters for rounding,
so that autograd here reproduces the notebook's ``t.grad`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

PARAMS = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")
ATOMS = (
    "emb", "embcat", "hprebn", "bnmeani", "bndiff", "bndiff2", "bnvar", "bnvar_inv", "bnraw", "hpreact",
    "h", "logits", "logit_maxes", "norm_logits", "counts", "counts_sum", "counts_sum_inv", "probs",
    "logprobs", "loss",
)
# The notebook's backward order: every gradient comes after the ones it is computed from.
GRADS = (
    "dlogprobs", "dprobs", "dcounts_sum_inv", "dcounts_sum", "dcounts", "dnorm_logits", "dlogit_maxes",
    "dlogits", "dh", "dW2", "db2", "dhpreact", "dbngain", "dbnbias", "dbnraw", "dbnvar_inv", "dbnvar",
    "dbndiff2", "dbndiff", "dbnmeani", "dhprebn", "dembcat", "dW1", "db1", "demb", "dC",
)
# The gradients each one is computed from by the chain rule (the notebook's solution).
PARENTS = {
    "dlogprobs": (), "dprobs": ("dlogprobs",), "dcounts_sum_inv": ("dprobs",),
    "dcounts_sum": ("dcounts_sum_inv",), "dcounts": ("dprobs", "dcounts_sum"), "dnorm_logits": ("dcounts",),
    "dlogit_maxes": ("dnorm_logits",), "dlogits": ("dnorm_logits", "dlogit_maxes"), "dh": ("dlogits",),
    "dW2": ("dlogits",), "db2": ("dlogits",), "dhpreact": ("dh",), "dbngain": ("dhpreact",),
    "dbnbias": ("dhpreact",), "dbnraw": ("dhpreact",), "dbnvar_inv": ("dbnraw",), "dbnvar": ("dbnvar_inv",),
    "dbndiff2": ("dbnvar",), "dbndiff": ("dbnraw", "dbndiff2"), "dbnmeani": ("dbndiff",),
    "dhprebn": ("dbndiff", "dbnmeani"), "dembcat": ("dhprebn",), "dW1": ("dhprebn",), "db1": ("dhprebn",),
    "demb": ("dembcat",), "dC": ("demb",),
}


def forward(p: Mapping[str, Tensor], Xb: Tensor, Yb: Tensor) -> dict[str, Tensor]:
    """The notebook's atomised forward pass; returns every atom by its notebook name."""
    C, W1, b1, W2, b2, bngain, bnbias = (p[k] for k in PARAMS)
    n = Xb.shape[0]
    emb = C[Xb]
    embcat = emb.view(n, -1)
    hprebn = embcat @ W1 + b1
    bnmeani = 1/n*hprebn.sum(0, keepdim=True)
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)
    bnvar_inv = (bnvar + 1e-5)**-0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdims=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    loss = -logprobs[range(n), Yb].mean()
    local = locals()
    return {k: local[k] for k in ATOMS}


def autograd(params: Mapping[str, Tensor], Xb: Tensor, Yb: Tensor,
             dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(atoms, gradients) of the forward in ``dtype``, as the notebook's ``loss.backward()`` gives them.

    Works on copies: the caller's tensors, and their ``.grad``, are left alone.
    """
    leaves = {k: params[k].detach().to(dtype).clone().requires_grad_(True) for k in PARAMS}
    with torch.enable_grad():
        atoms = forward(leaves, Xb, Yb)
        for k in ATOMS[:-1]:
            atoms[k].retain_grad()
        atoms["loss"].backward()
    grads = {"d" + k: t.grad for k, t in {**atoms, **leaves}.items() if k != "loss"}
    return {k: t.detach() for k, t in atoms.items()}, grads


def init_params(seed: int, dtype: torch.dtype = torch.float32, vocab: int = 27, n_embd: int = 10,
                block_size: int = 3, n_hidden: int = 64) -> dict[str, Tensor]:
    """The notebook's initialisation, with its small non-zero biases that unmask wrong gradients."""
    g = torch.Generator().manual_seed(seed)
    fan_in = n_embd * block_size
    p = {
        "C": torch.randn((vocab, n_embd), generator=g),
        "W1": torch.randn((fan_in, n_hidden), generator=g) * (5/3)/(fan_in**0.5),
        "b1": torch.randn(n_hidden, generator=g) * 0.1,
        "W2": torch.randn((n_hidden, vocab), generator=g) * 0.1,
        "b2": torch.randn(vocab, generator=g) * 0.1,
        "bngain": torch.randn((1, n_hidden), generator=g)*0.1 + 1.0,
        "bnbias": torch.randn((1, n_hidden), generator=g)*0.1,
    }
    return {k: v.to(dtype) for k, v in p.items()}
