"""The makemore "backprop ninja" MLP: data, init, the atomised forward and its hand-written
backward (exercise 1), the fused path through the library kernels (exercises 2 and 3), training
with manual gradients (exercise 4) and sampling.

Shapes: N batch rows, T = block_size context characters, V vocabulary, E = n_embd, H = n_hidden.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backprop import _check, batch_norm, cross_entropy, embedding, linear, tanh
from backprop.testing.references import batch_norm_composed

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "names.txt"  # the shipped list
BLOCK_SIZE = 3
N_EMBD = 10
INIT_SEED = 2147483647
SPLIT_SEED = 666
BN_EPS = 1e-5
PARAM_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Vocab:
    chars: tuple[str, ...]  # sorted characters of the data; '.' (index 0) is start/end

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    @property
    def stoi(self) -> dict[str, int]:
        return {"." : 0} | {ch: i + 1 for i, ch in enumerate(self.chars)}

    @property
    def itos(self) -> dict[int, str]:
        return {i: s for s, i in self.stoi.items()}


def read_words(path: str | Path) -> list[str]:
    """One word per line; blank lines are skipped. Raises ValueError on an unusable file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text: {e}") from None
    words = [w.strip() for w in text.splitlines() if w.strip()]
    if not words:
        raise ValueError(f"data file {str(path)!r} holds no words (expected one word per line)")
    if any("." in w for w in words):
        bad = next(w for w in words if "." in w)
        raise ValueError(f"data file {str(path)!r}: '.' is the start/end symbol, found in word {bad!r}")
    return words


def build_vocab(words: list[str]) -> Vocab:
    return Vocab(tuple(sorted(set("".join(words)))))


def build_dataset(words: list[str], vocab: Vocab, block_size: int = BLOCK_SIZE):
    """Every character of word + '.' is a target; its context is the block_size before it."""
    stoi = vocab.stoi
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X, dtype=torch.int64).reshape(-1, block_size), torch.tensor(Y, dtype=torch.int64)


@dataclass
class Dataset:
    words: list[str]
    vocab: Vocab
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # train / val / test: (X (n, T), Y (n,))

    def summary(self) -> dict:
        return {
            "words": len(self.words),
            "vocab_size": self.vocab.size,
            "examples": [int(self.splits[k][0].shape[0]) for k in ("train", "val", "test")],
        }


def load_dataset(path: str | Path, split_seed: int = SPLIT_SEED) -> Dataset:
    """Shuffle the words with random.seed(split_seed) and split 80% / 10% / 10%, as the seed does."""
    words = read_words(path)
    vocab = build_vocab(words)
    shuffled = list(words)
    random.Random(split_seed).shuffle(shuffled)  # the same order as random.seed(s); random.shuffle
    n1, n2 = int(0.8 * len(shuffled)), int(0.9 * len(shuffled))
    parts = {"train": shuffled[:n1], "val": shuffled[n1:n2], "test": shuffled[n2:]}
    empty = [k for k, v in parts.items() if not v]
    if empty:  # training and evaluation need every split (6 words is the least that fills them)
        sizes = " / ".join(str(len(v)) for v in parts.values())
        raise ValueError(f"{path}: {len(words)} words split 80/10/10 into {sizes} words, leaving the "
                         f"{' and '.join(empty)} split empty; give at least 6 words")
    return Dataset(words, vocab, {k: build_dataset(v, vocab) for k, v in parts.items()})


# ----------------------------------------------------------------------------- parameters


def init_params(vocab_size: int, n_hidden: int = 64, *, n_embd: int = N_EMBD,
                block_size: int = BLOCK_SIZE, seed: int = INIT_SEED, dtype=torch.float32,
                device="cpu", generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The seed's deliberately non-standard init (no zeros for a wrong backward to hide behind).
    Every draw comes from one seeded generator, in the seed's order."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    fan_in = n_embd * block_size
    p = {
        "C": torch.randn((vocab_size, n_embd), generator=g),
        "W1": torch.randn((fan_in, n_hidden), generator=g) * (5 / 3) / fan_in**0.5,
        "b1": torch.randn(n_hidden, generator=g) * 0.1,
        "W2": torch.randn((n_hidden, vocab_size), generator=g) * 0.1,
        "b2": torch.randn(vocab_size, generator=g) * 0.1,
        "bngain": torch.randn((1, n_hidden), generator=g) * 0.1 + 1.0,
        "bnbias": torch.randn((1, n_hidden), generator=g) * 0.1,
    }
    return {k: v.to(dtype=dtype, device=device) for k, v in p.items()}


def count_params(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


# ----------------------------------------------------------------------------- exercise 1
# The forward "chunked" into atoms, each simple enough to differentiate by eye.


def atomised_forward(p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor):
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


def autograd_gradients(p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor):
    """The same atomised forward under torch.autograd: .grad of every atom and parameter."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    loss, a = atomised_forward(leaves, Xb, Yb)
    for t in a.values():
        t.retain_grad()
    loss.backward()
    grads = {k: v.grad for k, v in a.items()} | {k: v.grad for k, v in leaves.items()}
    return loss.detach(), grads


# ----------------------------------------------------------------------------- exercises 2 and 3
# The same model through the library kernels: fused cross-entropy and fused BatchNorm backward.


def fused_forward(p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor):
    """Returns (loss, caches). Linear weights are the notebook's (in, out) matrices transposed
    into F.linear's (out, in) layout: a view, no copy."""
    n = Xb.shape[0]
    emb, c_emb = embedding.forward(Xb, p["C"])  # (N, T, E)
    hprebn, c_l1 = linear.forward(emb.view(n, -1), p["W1"].T, p["b1"])  # (N, H)
    hpreact, c_bn = batch_norm.forward(hprebn, p["bngain"].view(-1), p["bnbias"].view(-1),
                                       eps=BN_EPS, correction=1)  # (N, H)
    h, c_tanh = tanh.forward(hpreact)  # (N, H)
    logits, c_l2 = linear.forward(h, p["W2"].T, p["b2"])  # (N, V)
    loss, c_ce = cross_entropy.forward(logits, Yb)
    return loss, (c_emb, c_l1, c_bn, c_tanh, c_l2, c_ce)


def fused_backward(caches) -> dict[str, torch.Tensor]:
    """Gradients of every parameter, plus dlogits (exercise 2) and dhprebn (exercise 3)."""
    c_emb, c_l1, c_bn, c_tanh, c_l2, c_ce = caches
    dloss = torch.ones((), dtype=c_ce.logits.dtype, device=c_ce.logits.device)
    dlogits, _ = cross_entropy.backward(dloss, c_ce)  # (softmax - onehot) / n
    dh, dW2t, db2 = linear.backward(dlogits, c_l2)
    (dhpreact,) = tanh.backward(dh, c_tanh)
    dhprebn, dbngain, dbnbias = batch_norm.backward(dhpreact, c_bn)
    dembcat, dW1t, db1 = linear.backward(dhprebn, c_l1)
    n, T = c_emb.indices.shape
    _, dC = embedding.backward(dembcat.view(n, T, -1), c_emb)
    return {"logits": dlogits, "hprebn": dhprebn, "C": dC, "W1": dW1t.T, "b1": db1,
            "W2": dW2t.T, "b2": db2, "bngain": dbngain.view(1, -1), "bnbias": dbnbias.view(1, -1)}


def autograd_loss(p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> torch.Tensor:
    """The exercise-4 forward in plain torch ops, for training with autograd."""
    n = Xb.shape[0]
    hprebn = p["C"][Xb].view(n, -1) @ p["W1"] + p["b1"]
    hpreact = batch_norm_composed(hprebn, p["bngain"].view(-1), p["bnbias"].view(-1),
                                  eps=BN_EPS, correction=1)
    return F.cross_entropy(torch.tanh(hpreact) @ p["W2"] + p["b2"], Yb)


# ----------------------------------------------------------------------------- the gradient table

EXERCISE1_ROWS = ("logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits",
                  "logit_maxes", "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw",
                  "bnvar_inv", "bnvar", "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1",
                  "b1", "emb", "C")
FUSED_ROWS = ("logits", "hprebn", *PARAM_NAMES)


@dataclass(frozen=True)
class Row:
    """The notebook's cmp: exact (bit-identical), approximate (torch.allclose), maxdiff."""

    name: str
    exact: bool
    approximate: bool
    maxdiff: float


def cmp(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> Row:
    return Row(name, bool(torch.equal(ours, theirs)), bool(torch.allclose(ours, theirs)),
               float((ours - theirs).abs().max()))


def gradient_table(p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor):
    """Returns (loss, rows): exercise 1 (atomised, by hand) then the fused rows, against autograd."""
    loss, grads = autograd_gradients(p, Xb, Yb)
    with torch.no_grad():
        _, atoms = atomised_forward(p, Xb, Yb)
        manual = atomised_backward(p, atoms, Xb, Yb)
    _, caches = fused_forward(p, Xb, Yb)
    fused = fused_backward(caches)
    rows = [cmp(k, manual[k], grads[k]) for k in EXERCISE1_ROWS]
    rows += [cmp(f"fused {k}", fused[k], grads[k]) for k in FUSED_ROWS]
    return float(loss), rows


# ----------------------------------------------------------------------------- exercise 4


class GradientDrift(RuntimeError):
    """Manual gradients no longer agree with autograd (raised by --verify-every)."""


@dataclass
class Model:
    params: dict[str, torch.Tensor]
    vocab: Vocab
    bnmean: torch.Tensor | None = None  # (1, H) calibrated over the training set
    bnvar: torch.Tensor | None = None  # (1, H) Bessel-corrected, as in training

    def state(self) -> dict:
        """Tensors on the CPU, strings and ints: loadable with torch.load(weights_only=True)."""
        return {"params": {k: v.cpu() for k, v in self.params.items()}, "bnmean": self.bnmean.cpu(),
                "bnvar": self.bnvar.cpu(), "chars": list(self.vocab.chars), "block_size": BLOCK_SIZE}

    @classmethod
    def from_state(cls, state: dict) -> Model:
        return cls(state["params"], Vocab(tuple(state["chars"])), state["bnmean"], state["bnvar"])


def learning_rate(step: int, lr: float, decay_step: int) -> float:
    return lr if step < decay_step else lr / 10


def train(dataset: Dataset, *, steps: int = 200_000, hidden: int = 200, batch_size: int = 32,
          lr: float = 0.1, lr_decay_step: int = 100_000, backward: str = "manual",
          verify_every: int = 0, seed: int = INIT_SEED, device="cpu", dtype=torch.float32,
          compile: bool = False, on_compile_error=None, progress=None) -> tuple[Model, list[float]]:
    """Exercise 4: SGD with manual gradients (or autograd), returning the model and the losses.
    One generator seeds the init and then draws the batches, as in the seed. compile=True runs
    the manual steps through compiled_trainer (verify steps stay eager); if building it fails,
    on_compile_error(exception) is called and training goes on eager, or, without a handler, the
    error is raised."""
    if backward not in ("manual", "autograd"):
        raise ValueError(f"backward must be 'manual' or 'autograd', got {backward!r}")
    if compile and backward != "manual":
        raise ValueError("compile applies to the manual backward only, got backward='autograd'")
    g = torch.Generator().manual_seed(seed)
    params = init_params(dataset.vocab.size, hidden, generator=g, dtype=dtype, device=device)
    Xtr, Ytr = (t.to(device) for t in dataset.splits["train"])
    _check_once(params, Xtr, Ytr, batch_size)
    if compile:
        try:
            fast_step = compiled_trainer(params, Xtr, Ytr, batch_size, check=False)  # checked above
        except Exception as e:  # torch.export / Inductor / the C++ compiler: many kinds
            if on_compile_error is None:
                raise
            on_compile_error(e)
            compile = False
    if compile:
        rates = {r: torch.tensor(r, dtype=dtype, device=device) for r in (lr, lr / 10)}
    history = torch.empty(steps, dtype=dtype, device=device)  # losses, read back once at the end
    for step in range(steps):
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g).to(device)
        rate = learning_rate(step, lr, lr_decay_step)
        check = step if backward == "manual" and verify_every and step % verify_every == 0 else None
        if compile and check is None:
            loss = fast_step(ix, rates[rate])  # gathers the batch itself
        else:
            Xb, Yb = Xtr.index_select(0, ix), Ytr.index_select(0, ix)
            if backward == "autograd":
                loss = autograd_step(params, Xb, Yb, rate)
            else:
                loss = manual_step(params, Xb, Yb, rate, verify_at=check)
        history[step] = loss.detach()
        if progress is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
            progress(step + 1, steps, float(loss))
    params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
    model = Model(params, dataset.vocab)
    calibrate(model, dataset.splits["train"][0].to(device))
    return model, history.tolist()


def _check_once(params, X, Y, batch_size: int) -> None:
    """The checks the unchecked training step skips, done once: every index of the training set
    in range, and one batch through the checked kernels (shapes, dtypes, devices)."""
    V = params["C"].shape[0]
    _check.in_range("training contexts", X, 0, V)
    _check.in_range("training targets", Y, 0, V)
    with torch.no_grad():
        fused_backward(fused_forward(params, X[:batch_size], Y[:batch_size])[1])


# The trainer's inputs are valid by construction (parameters from init_params, indices from the
# vocabulary, checked once in train), so its step runs the kernels' maths without their checks:
# the chain of fused_forward / fused_backward minus ~20 argument checks and two device syncs.


def manual_grads(p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor):
    """(loss, [dC, dW1, db1, dW2, db2, dbngain, dbnbias]) through the kernels' forward_math and
    backward_math: the same kernels as fused_forward / fused_backward, unchecked."""
    n = Xb.shape[0]
    emb, c_emb = embedding.forward_math(embedding.Args(Xb, p["C"], padding_idx=None, deterministic=True))
    hprebn, c_l1 = linear.forward_math(linear.Args(emb.view(n, -1), p["W1"].T, p["b1"]))  # (N, H)
    hpreact, c_bn = batch_norm.forward_math(batch_norm.Args(
        hprebn, p["bngain"].view(-1), p["bnbias"].view(-1), eps=BN_EPS, correction=1))  # (N, H)
    h, c_tanh = tanh.forward_math(tanh.Args(hpreact))  # (N, H)
    logits, c_l2 = linear.forward_math(linear.Args(h, p["W2"].T, p["b2"]))  # (N, V)
    # no row is ignored: the targets are already safe, no mask, n valid rows
    loss, c_ce = cross_entropy.forward_math(cross_entropy.Args(
        logits, Yb, valid=None, count=n, reduction="mean", label_smoothing=0.0))
    dlogits, _ = cross_entropy.backward_math(torch.ones_like(loss), c_ce)
    dh, dW2t, db2 = linear.backward_math(dlogits, c_l2)
    (dhpreact,) = tanh.backward_math(dh, c_tanh)
    dhprebn, dbngain, dbnbias = batch_norm.backward_math(dhpreact, c_bn)
    dembcat, dW1t, db1 = linear.backward_math(dhprebn, c_l1)
    _, dC = embedding.backward_math(dembcat.view(emb.shape), c_emb)
    return loss, [dC, dW1t.T, db1, dW2t.T, db2, dbngain.view(1, -1), dbnbias.view(1, -1)]


def _sgd_step(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor,
              lr: float | torch.Tensor) -> torch.Tensor:
    loss, grads = manual_grads(params, Xb, Yb)
    _sgd_update(params, grads, lr)
    return loss


def _sgd_update(params: dict[str, torch.Tensor], grads: list[torch.Tensor], lr: float | torch.Tensor) -> None:
    """p -= lr * grad for every parameter, paired by name (grads in PARAM_NAMES order)."""
    if isinstance(lr, torch.Tensor):  # a graph input under torch.compile: no recompile per value
        torch._foreach_sub_([params[k] for k in PARAM_NAMES], torch._foreach_mul(grads, lr))
    else:
        torch._foreach_add_([params[k] for k in PARAM_NAMES], grads, alpha=-lr)


def manual_step(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, lr: float,
                *, verify_at: int | None = None) -> torch.Tensor:
    """One SGD step on the library kernels' gradients; with verify_at (the step number), compare
    them with autograd first. Returns the loss."""
    if verify_at is None:
        with torch.no_grad():  # the kernels need none; entering it once saves one per kernel
            return _sgd_step(params, Xb, Yb, lr)
    with torch.no_grad():
        loss, grads = manual_grads(params, Xb, Yb)
    verify(params, Xb, Yb, dict(zip(PARAM_NAMES, grads)), verify_at)  # before the update
    with torch.no_grad():
        _sgd_update(params, grads, lr)
    return loss


# ----------------------------------------------------------------------------- the compiled step
# At batch 32 one step is ~35 kernels of a few microseconds: driving them from Python (the eager
# step) or through Dynamo's guards and wrappers (torch.compile) costs more than the arithmetic.
# On the CPU the step is compiled ahead of time instead: torch.export captures the batch gather,
# manual_grads and the in-place update as one graph, AOTInductor builds it into a shared library,
# and each step is one call into C++. The build (~30 s) is cached on disk, keyed by everything the
# graph depends on. On CUDA the step goes through torch.compile (no host C++ build needed).


def _step_graph(C, W1, b1, W2, b2, bngain, bnbias, Xtr, Ytr, ix, lr):
    """One SGD step on the batch ix of (Xtr, Ytr), updating the parameters in place; the loss.
    Flat tensor arguments: the compiled graph's inputs."""
    params = dict(zip(PARAM_NAMES, (C, W1, b1, W2, b2, bngain, bnbias)))
    return _sgd_step(params, Xtr.index_select(0, ix), Ytr.index_select(0, ix), lr)


class _StepModule(torch.nn.Module):  # torch.export takes a Module
    def forward(self, *args):
        return _step_graph(*args)


_KERNEL_MODULES = (embedding, linear, batch_norm, tanh, cross_entropy)


def aot_cache_dir() -> Path:
    """Where built steps are kept: $BACKPROP_CACHE_DIR, else $XDG_CACHE_HOME/backprop (~/.cache)."""
    if os.environ.get("BACKPROP_CACHE_DIR"):
        return Path(os.environ["BACKPROP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backprop"


def aot_step_path(params: dict[str, torch.Tensor], Xtr: torch.Tensor, batch_size: int) -> Path:
    """The package for these shapes and dtypes, this torch and this code (any edit rebuilds)."""
    h = hashlib.sha256(torch.__version__.encode())
    for module in (sys.modules[__name__], *_KERNEL_MODULES, _check):
        h.update(Path(module.__file__).read_bytes())
    h.update(repr([(k, tuple(params[k].shape), params[k].dtype) for k in PARAM_NAMES]).encode())
    h.update(repr((tuple(Xtr.shape[1:]), Xtr.dtype, batch_size)).encode())
    return aot_cache_dir() / f"train_step-{h.hexdigest()[:24]}.pt2"


def _build_aot_step(path: Path, args: tuple) -> None:
    """Export the step (the number of training examples stays symbolic) and build the package,
    written under a temporary name and renamed, so a concurrent run never reads half a file."""
    examples = torch.export.Dim("examples", min=2)
    dynamic = (None,) * 7 + ({0: examples}, {0: examples}, None, None)
    with torch.no_grad():
        # forward(*args) takes one argument to export: the tuple, hence (dynamic,)
        program = torch.export.export(_StepModule(), args, dynamic_shapes=(dynamic,))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    os.replace(tmp, path)


_dynamo_steps: dict[str, object] = {}  # torch.compile'd _step_graph, per device type


def compiled_trainer(params: dict[str, torch.Tensor], Xtr: torch.Tensor, Ytr: torch.Tensor,
                     batch_size: int, *, check: bool = True):
    """A step function (ix, lr) -> loss for these parameters and this training set: _step_graph,
    compiled (AOTInductor on the CPU, built once and cached; torch.compile on CUDA). ix holds the
    batch's row numbers (int64, (batch_size,), in [0, len(Xtr))), lr is a 0-d tensor of the
    parameters' dtype; the parameters are updated in place. The built step reads raw memory and
    checks nothing, so the arguments are checked here: the fixed ones once, ix and lr on every
    call. check=False skips both, for a caller that has validated its data and draws ix itself
    (train, after _check_once)."""
    if check:
        _check_trainer_inputs(params, Xtr, Ytr, batch_size)
    flat = (*(params[k] for k in PARAM_NAMES), Xtr, Ytr)
    device = params["W1"].device
    if device.type == "cpu":
        path = aot_step_path(params, Xtr, batch_size)
        if not path.exists():
            ix = torch.zeros(batch_size, dtype=torch.int64)
            _build_aot_step(path, (*flat, ix, torch.tensor(0.0, dtype=params["W1"].dtype)))
        # the loaded model's loader runs a flat list of tensors; calling the model itself would
        # first parse its input/output specs and flatten the arguments (~100 us a step)
        run = torch._inductor.aoti_load_package(str(path)).loader.run

        def fast(ix, lr):
            return run([*flat, ix, lr])[0]
    else:
        if device.type not in _dynamo_steps:
            _dynamo_steps[device.type] = torch.compile(_step_graph, dynamic=False)
        fn = _dynamo_steps[device.type]

        def fast(ix, lr):
            with torch.no_grad():
                return fn(*flat, ix, lr)
    if not check:
        return fast

    def step(ix, lr):
        _check.shape("ix", _check.index("ix", ix, (torch.int64,)), (batch_size,), "(batch_size,)")
        _check.shape("lr", _check.same_dtype_as("lr", lr, "the parameters", params["W1"]), (), "(0-d)")
        _check.same_device(ix=ix, lr=lr, W1=params["W1"])
        _check.in_range("ix", ix, 0, Xtr.shape[0])
        return fast(ix, lr)
    return step


def _check_trainer_inputs(params, Xtr, Ytr, batch_size: int) -> None:
    """What the built step assumes: dense tensors on one device, the parameters of one floating
    dtype with the shapes init_params gives, int64 contexts and targets in the vocabulary."""
    missing = [k for k in PARAM_NAMES if k not in params]
    if missing:
        raise ValueError(f"params must hold {', '.join(PARAM_NAMES)}, missing {', '.join(missing)}")
    for k in PARAM_NAMES:
        _check.same_dtype_as(f"params[{k!r}]", params[k], "params['W1']", params["W1"])
    for name, t in [*((f"params[{k!r}]", params[k]) for k in PARAM_NAMES), ("Xtr", Xtr), ("Ytr", Ytr)]:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    _check.same_device(Xtr=Xtr, Ytr=Ytr, **{k: params[k] for k in PARAM_NAMES})
    V, E = params["C"].shape
    H = params["W1"].shape[1]
    expected = {"C": (V, E), "W1": (BLOCK_SIZE * E, H), "b1": (H,), "W2": (H, V), "b2": (V,),
                "bngain": (1, H), "bnbias": (1, H)}
    for k, shape in expected.items():
        _check.shape(f"params[{k!r}]", params[k], shape, "(init_params' layout)")
    _check.index("Xtr", Xtr, (torch.int64,))
    _check.index("Ytr", Ytr, (torch.int64,))
    _check.ndim("Xtr", Xtr, 2, "(examples, block_size)")
    _check.shape("Xtr", Xtr, (Xtr.shape[0], BLOCK_SIZE), "(examples, block_size)")
    _check.shape("Ytr", Ytr, (Xtr.shape[0],), "(examples,) like Xtr")
    if Xtr.shape[0] < 2:
        raise ValueError(f"Xtr must hold at least 2 examples, got {Xtr.shape[0]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2 (batch norm needs 2 rows), got {batch_size!r}")
    _check.in_range("Xtr", Xtr, 0, V)
    _check.in_range("Ytr", Ytr, 0, V)


def autograd_step(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor,
                  lr: float) -> torch.Tensor:
    """One SGD step on autograd's gradients of the same model. Returns the loss."""
    for p in params.values():
        p.requires_grad_()
        p.grad = None
    loss = autograd_loss(params, Xb, Yb)
    loss.backward()
    with torch.no_grad():
        for p in params.values():
            p.sub_(p.grad, alpha=lr)
    return loss


def first_batch(dataset: Dataset, hidden: int, *, batch_size: int = 32, seed: int = INIT_SEED,
                dtype=torch.float32, device="cpu"):
    """Seeded init, then one training batch drawn from the same generator, as the notebook does."""
    g = torch.Generator().manual_seed(seed)
    params = init_params(dataset.vocab.size, hidden, generator=g, dtype=dtype, device=device)
    X, Y = dataset.splits["train"]
    ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)
    return params, X[ix].to(device), Y[ix].to(device)


def verify(params, Xb, Yb, grads, step: int) -> None:
    """Compare the manual gradients with autograd on this batch. The two round differently, and
    db1 is pure cancellation (BatchNorm removes b1's effect), so the bar is absolute: 1000 units
    of rounding of the largest gradient entry in the model, far below any real bug."""
    _, reference = autograd_gradients(params, Xb, Yb)
    scale = max(float(reference[name].abs().max()) for name in PARAM_NAMES)
    bound = 1000 * torch.finfo(reference["W1"].dtype).eps * scale
    for name in PARAM_NAMES:
        maxdiff = float((grads[name] - reference[name]).abs().max())
        if not maxdiff <= bound:  # also catches nan
            raise GradientDrift(
                f"step {step}: manual d{name} drifted from autograd: maxdiff {maxdiff:.3g} > "
                f"{bound:.3g} (1000 eps x the largest gradient entry)"
            )


@torch.no_grad()
def hidden_preact(model: Model, X: torch.Tensor) -> torch.Tensor:
    p = model.params
    return p["C"][X].view(X.shape[0], -1) @ p["W1"] + p["b1"]  # (N, H)


@torch.no_grad()
def calibrate(model: Model, Xtr: torch.Tensor) -> None:
    """Fix the BatchNorm statistics over the whole training set, for evaluation and sampling."""
    hprebn = hidden_preact(model, Xtr)
    model.bnmean = hprebn.mean(0, keepdim=True)
    model.bnvar = hprebn.var(0, keepdim=True, unbiased=True)


@torch.no_grad()
def logits_eval(model: Model, X: torch.Tensor) -> torch.Tensor:
    p = model.params
    hpreact = p["bngain"] * (hidden_preact(model, X) - model.bnmean) * (model.bnvar + BN_EPS) ** -0.5
    return torch.tanh(hpreact + p["bnbias"]) @ p["W2"] + p["b2"]  # (N, V)


@torch.no_grad()
def evaluate(model: Model, X: torch.Tensor, Y: torch.Tensor) -> float:
    return float(F.cross_entropy(logits_eval(model, X), Y))


@torch.no_grad()
def sample(model: Model, n: int = 20, seed: int = INIT_SEED + 10, max_len: int = 100) -> list[str]:
    """Draw n words, one character at a time from the calibrated model."""
    g = torch.Generator().manual_seed(seed)
    itos = model.vocab.itos
    device = model.params["C"].device
    words = []
    for _ in range(n):
        out, context = [], [0] * BLOCK_SIZE
        while len(out) < max_len:
            probs = F.softmax(logits_eval(model, torch.tensor([context], device=device)), dim=1)
            ix = int(torch.multinomial(probs.cpu(), num_samples=1, generator=g))
            if ix == 0:
                break
            out.append(ix)
            context = context[1:] + [ix]
        words.append("".join(itos[i] for i in out))
    return words
