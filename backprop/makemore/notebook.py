"""The notebook's exercises 1 to 3 and its gradient table (``backprop check``).

Exercise 1: the forward "chunked" into atoms, each simple enough to differentiate by eye, and
every atom's gradient by hand. Exercises 2 and 3: the fused cross-entropy and BatchNorm backward,
here the library kernels (model.forward / model.backward on the checked kernels).

Shapes: N batch rows, T = block_size context characters, V vocabulary, E = n_embd, H = n_hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from backprop.makemore import model
from backprop.makemore.data import Dataset
from backprop.makemore.model import BN_EPS, INIT_SEED, PARAM_NAMES


def first_batch(dataset: Dataset, hidden: int, *, batch_size: int = 32, seed: int = INIT_SEED,
                dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu",
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Seeded init, then one training batch drawn from the same generator, as the notebook does."""
    g = torch.Generator().manual_seed(seed)
    params = model.init_params(dataset.vocab.size, hidden, generator=g, dtype=dtype, device=device)
    X, Y = dataset.splits["train"]
    ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)
    return params, X[ix].to(device), Y[ix].to(device)


def atomised_forward(p: dict[str, torch.Tensor], Xb: torch.Tensor,
                     Yb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss, atoms): the notebook's forward, one small op per line."""
    n = Xb.shape[0]
    a = {}
    a["emb"] = p["C"][Xb]  # (N, T, E)
    a["embcat"] = a["emb"].view(n, -1)  # (N, T*E)
    a["hprebn"] = a["embcat"] @ p["W1"] + p["b1"]  # (N, H)
    a["bnmeani"] = 1 / n * a["hprebn"].sum(0, keepdim=True)  # (1, H)
    a["bndiff"] = a["hprebn"] - a["bnmeani"]  # (N, H)
    a["bndiff2"] = a["bndiff"] ** 2  # (N, H)
    a["bnvar"] = 1 / (n - 1) * a["bndiff2"].sum(0, keepdim=True)  # (1, H) Bessel: 1/(n-1)
    a["bnvar_inv"] = (a["bnvar"] + BN_EPS) ** -0.5  # (1, H)
    a["bnraw"] = a["bndiff"] * a["bnvar_inv"]  # (N, H)
    a["hpreact"] = p["bngain"] * a["bnraw"] + p["bnbias"]  # (N, H)
    a["h"] = torch.tanh(a["hpreact"])  # (N, H)
    a["logits"] = a["h"] @ p["W2"] + p["b2"]  # (N, V)
    a["logit_maxes"] = a["logits"].max(1, keepdim=True).values  # (N, 1)
    a["norm_logits"] = a["logits"] - a["logit_maxes"]  # (N, V) shifted: exp cannot overflow
    a["counts"] = a["norm_logits"].exp()  # (N, V)
    a["counts_sum"] = a["counts"].sum(1, keepdim=True)  # (N, 1)
    a["counts_sum_inv"] = a["counts_sum"] ** -1  # (N, 1)
    a["probs"] = a["counts"] * a["counts_sum_inv"]  # (N, V)
    a["logprobs"] = a["probs"].log()  # (N, V)
    loss = -a["logprobs"][torch.arange(n), Yb].mean()
    return loss, a


def atomised_backward(p: dict[str, torch.Tensor], a: dict[str, torch.Tensor], Xb: torch.Tensor,
                      Yb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every atom's and parameter's gradient by hand, in reverse order. Each line quotes the
    forward line it inverts; the returned dict maps a name to d(loss)/d(name)."""
    n = Xb.shape[0]
    d = {}
    # loss = -logprobs[range(n), Yb].mean()
    d["logprobs"] = torch.zeros_like(a["logprobs"])
    d["logprobs"][torch.arange(n), Yb] = -1.0 / n
    # logprobs = probs.log()
    d["probs"] = d["logprobs"] / a["probs"]
    # probs = counts * counts_sum_inv  (counts_sum_inv broadcast over V: sum its gradient)
    d["counts_sum_inv"] = (a["counts"] * d["probs"]).sum(1, keepdim=True)
    d["counts"] = d["probs"] * a["counts_sum_inv"]
    # counts_sum_inv = counts_sum**-1
    d["counts_sum"] = d["counts_sum_inv"] * (-a["counts_sum"] ** -2)
    # counts_sum = counts.sum(1): every count gets the row's gradient
    d["counts"] = d["counts"] + d["counts_sum"].expand_as(a["counts"])
    # counts = norm_logits.exp()
    d["norm_logits"] = d["counts"] * a["counts"]
    # norm_logits = logits - logit_maxes
    d["logit_maxes"] = -d["norm_logits"].sum(1, keepdim=True)
    # logit_maxes = logits.max(1): the gradient goes to the argmax
    maxes_onehot = F.one_hot(a["logits"].max(1).indices, num_classes=a["logits"].shape[1])
    d["logits"] = d["norm_logits"] + maxes_onehot * d["logit_maxes"]
    # logits = h @ W2 + b2
    d["h"] = d["logits"] @ p["W2"].T
    d["W2"] = a["h"].T @ d["logits"]
    d["b2"] = d["logits"].sum(0)
    # h = tanh(hpreact)
    # 1 - h**2 with a single rounding (a fused multiply-add), as torch's tanh_backward computes
    # it; (1.0 - h**2) rounds h**2 first and is then ~1 ulp off autograd, not bit-exact
    d["hpreact"] = d["h"] * torch.addcmul(torch.ones_like(a["h"]), a["h"], a["h"], value=-1.0)
    # hpreact = bngain * bnraw + bnbias
    d["bngain"] = (a["bnraw"] * d["hpreact"]).sum(0, keepdim=True)
    d["bnraw"] = d["hpreact"] * p["bngain"]
    d["bnbias"] = d["hpreact"].sum(0, keepdim=True)
    # bnraw = bndiff * bnvar_inv
    d["bnvar_inv"] = (d["bnraw"] * a["bndiff"]).sum(0, keepdim=True)
    d["bndiff"] = d["bnraw"] * a["bnvar_inv"]
    # bnvar_inv = (bnvar + eps)**-0.5
    d["bnvar"] = d["bnvar_inv"] * (-0.5 * (a["bnvar"] + BN_EPS) ** -1.5)
    # bnvar = 1/(n-1) * bndiff2.sum(0)
    d["bndiff2"] = (d["bnvar"] * (1 / (n - 1))).expand_as(a["bndiff2"])
    # bndiff2 = bndiff**2
    d["bndiff"] = d["bndiff"] + d["bndiff2"] * (2 * a["bndiff"])
    # bndiff = hprebn - bnmeani
    d["bnmeani"] = -d["bndiff"].sum(0, keepdim=True)
    # bnmeani = 1/n * hprebn.sum(0)
    d["hprebn"] = d["bndiff"] + (d["bnmeani"] * (1 / n)).expand_as(a["hprebn"])
    # hprebn = embcat @ W1 + b1
    d["embcat"] = d["hprebn"] @ p["W1"].T
    d["W1"] = a["embcat"].T @ d["hprebn"]
    d["b1"] = d["hprebn"].sum(0)
    # embcat = emb.view(n, -1)
    d["emb"] = d["embcat"].view(a["emb"].shape)
    # emb = C[Xb]: rows used several times accumulate
    d["C"] = torch.zeros_like(p["C"]).index_add_(0, Xb.reshape(-1), d["emb"].reshape(-1, p["C"].shape[1]))
    return d


def autograd_gradients(p: dict[str, torch.Tensor], Xb: torch.Tensor,
                       Yb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same atomised forward under torch.autograd: .grad of every atom and parameter."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    loss, a = atomised_forward(leaves, Xb, Yb)
    for t in a.values():
        t.retain_grad()
    loss.backward()
    grads = {k: v.grad for k, v in a.items()} | {k: v.grad for k, v in leaves.items()}
    return loss.detach(), grads


EXERCISE1_ROWS = ("logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits",
                  "logit_maxes", "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw",
                  "bnvar_inv", "bnvar", "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1",
                  "b1", "emb", "C")
FUSED_ROWS = ("logits", "hprebn", *PARAM_NAMES)


# The verdict: the acceptance rule of the library's tests (backprop.testing.compare), restated
# here so that the program does not import the test tooling. torch.allclose against autograd in the
# same dtype cries wolf on gradients that cancel to nearly zero (b1: the batch norm after it
# removes any shift), where both ours and autograd's are rounding noise; against float64 the
# kernels' error is at most a small multiple of autograd's own.
ERROR_RATIO = 2.0
FLOOR_ULPS = 4
FORWARD_RATIO_CAP = 100.0
ACCEPTANCE = (f"error against float64 autograd <= {ERROR_RATIO:g} x autograd's own error in the same "
              f"dtype + {FLOOR_ULPS} ulps of the largest term; float64: allclose(rtol=1e-7, atol=1e-7)")


def accept(ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor,
           magnitude: torch.Tensor | None = None, ratio: float = ERROR_RATIO) -> tuple[bool, float, float]:
    """(passed, our error, torch's error) against the float64 reference. magnitude (optional) is
    the size of the terms summed to make each entry, the scale of the rounding when they cancel."""
    ref = reference.detach().double().cpu()
    err = float((ours.detach().double().cpu() - ref).abs().max())
    torch_err = float((theirs.detach().double().cpu() - ref).abs().max())
    if ours.dtype == torch.float64:
        return bool(torch.allclose(ours.detach().cpu(), ref, rtol=1e-7, atol=1e-7)), err, torch_err
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if magnitude is not None:
        scale = max(scale, float(magnitude.detach().double().abs().max()))
    floor = FLOOR_ULPS * torch.finfo(ours.dtype).eps * scale + torch.finfo(ours.dtype).tiny
    passed = math.isfinite(err) and err <= ratio * torch_err + floor
    return passed, err, torch_err


def _magnitudes(p: dict[str, torch.Tensor], a: dict[str, torch.Tensor], d: dict[str, torch.Tensor],
                Xb: torch.Tensor) -> dict[str, torch.Tensor]:
    """The size of the terms summed to make each gradient from the logits down: the backward
    chain again over absolute values (Higham's |A||B| for each product), in float64. The batch
    norm's backward cancels: with a few rows, its input's gradient (and all below it) is rounding
    noise around ~0 whose size follows these terms, not the result; so may a column sum."""
    n = Xb.shape[0]
    m = {"logits": a["probs"] / n + d["logits"].abs()}  # (softmax - onehot) / n: both terms
    m["h"] = m["logits"] @ p["W2"].abs().T
    m["W2"] = a["h"].abs().T @ m["logits"]
    m["b2"] = m["logits"].sum(0)
    m["hpreact"] = m["h"] * (1 - a["h"] ** 2)
    m["bnbias"] = m["hpreact"].sum(0, keepdim=True)
    m["bngain"] = (a["bnraw"].abs() * m["hpreact"]).sum(0, keepdim=True)
    # dy, mean(dy) and xhat * mean(dy * xhat): three terms of the size of dy (|xhat| ~ 1)
    m["hprebn"] = 3 * m["hpreact"] * p["bngain"].abs() * a["bnvar_inv"]
    m["embcat"] = m["hprebn"] @ p["W1"].abs().T
    m["W1"] = a["embcat"].abs().T @ m["hprebn"]
    m["b1"] = m["hprebn"].sum(0)
    m["emb"] = m["embcat"].view(a["emb"].shape)
    m["C"] = torch.zeros_like(p["C"]).index_add_(0, Xb.reshape(-1), m["emb"].reshape(-1, p["C"].shape[1]))
    return m


def _ratio(ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |theirs - reference|, 1 when both are 0."""
    err = float((ours.detach().double() - reference).abs().max())
    torch_err = float((theirs.detach().double() - reference).abs().max())
    return err / torch_err if torch_err > 0 else 1.0


@dataclass(frozen=True)
class Row:
    """The notebook's cmp (exact: bit-identical, approximate: torch.allclose, maxdiff: against
    autograd in the same dtype), shown for information; then the verdict (accept) it rests on."""

    name: str
    exact: bool
    approximate: bool
    maxdiff: float
    error: float  # max |ours - float64 autograd|
    torch_error: float  # max |autograd in this dtype - float64 autograd|
    passed: bool


def cmp(name: str, ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor,
        magnitude: torch.Tensor | None = None, ratio: float = ERROR_RATIO) -> Row:
    passed, err, torch_err = accept(ours, theirs, reference, magnitude, ratio)
    return Row(name, bool(torch.equal(ours, theirs)), bool(torch.allclose(ours, theirs)),
               float((ours - theirs).abs().max()), err, torch_err, passed)


def gradient_table(p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor,
                   kernels: SimpleNamespace = model.CHECKED) -> tuple[float, list[Row]]:
    """Returns (loss, rows): exercise 1 (atomised, by hand) then the fused rows (on kernels),
    against autograd, each judged against autograd of the same model in float64."""
    loss, grads = autograd_gradients(p, Xb, Yb)
    p64 = {k: v.double() for k, v in p.items()}
    _, reference = autograd_gradients(p64, Xb, Yb)
    with torch.no_grad():
        atoms64 = atomised_forward(p64, Xb, Yb)[1]
        magnitudes = _magnitudes(p64, atoms64, reference, Xb)
        _, atoms = atomised_forward(p, Xb, Yb)
        manual = atomised_backward(p, atoms, Xb, Yb)
    _, caches = model.forward(p, Xb, Yb, kernels)
    fused = model.backward(caches, kernels)
    # The fused rows differentiate the fused forward, whose h may be further from float64 than
    # autograd's: with a few rows, a hidden column spread near sqrt(eps) makes the batch norm
    # amplify its input's rounding, which F.linear and autograd's @ then + round differently.
    # The gradients inherit that forward error: allow it in the ratio, in proportion, up to
    # FORWARD_RATIO_CAP (beyond it the forward is wrong, not ill-conditioned).
    forward_ratio = _ratio(caches[4].x, atoms["h"], atoms64["h"]) if hasattr(caches[4], "x") else 1.0
    rows = [cmp(k, manual[k], grads[k], reference[k], magnitudes.get(k)) for k in EXERCISE1_ROWS]
    rows += [cmp(f"fused {k}", fused[k], grads[k], reference[k], magnitudes.get(k),
                 ERROR_RATIO * min(max(1.0, forward_ratio), FORWARD_RATIO_CAP)) for k in FUSED_ROWS]
    return float(loss), rows
