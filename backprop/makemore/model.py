"""The MLP: parameters and init, the kernel chain (written once, run on the checked kernels or
on their unchecked maths), its autograd twin, and the calibrated model for evaluation and sampling.

Shapes: N batch rows, T = block_size context characters, V vocabulary, E = n_embd, H = n_hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from backprop import batch_norm, cross_entropy, embedding, linear, tanh
from backprop.makemore.data import BLOCK_SIZE, Vocab

N_EMBD = 10
INIT_SEED = 2147483647
BN_EPS = 1e-5
PARAM_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")


def init_params(vocab_size: int, n_hidden: int = 64, *, n_embd: int = N_EMBD,
                block_size: int = BLOCK_SIZE, seed: int = INIT_SEED, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
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


# ----------------------------------------------------------------------------- the kernel chain
# One chain, two sets of kernels with the same signatures. CHECKED is the library: each forward
# validates its arguments (prepare) and each backward its dout. UNCHECKED runs the same
# forward_math / backward_math on Args built by name, for inputs valid by construction (the
# trainer checks its data once): ~20 argument checks and two device syncs fewer per step.

CHECKED = SimpleNamespace(embedding=embedding, linear=linear, batch_norm=batch_norm, tanh=tanh,
                          cross_entropy=cross_entropy)
UNCHECKED = SimpleNamespace(
    embedding=SimpleNamespace(
        forward=lambda indices, weight: embedding.forward_math(
            embedding.Args(indices, weight, padding_idx=None, deterministic=True)),
        backward=embedding.backward_math),
    linear=SimpleNamespace(
        forward=lambda x, weight, bias: linear.forward_math(linear.Args(x, weight, bias)),
        backward=linear.backward_math),
    batch_norm=SimpleNamespace(
        forward=lambda x, weight, bias, *, eps, correction: batch_norm.forward_math(
            batch_norm.Args(x, weight, bias, eps=eps, correction=correction)),
        backward=batch_norm.backward_math),
    tanh=SimpleNamespace(forward=lambda x: tanh.forward_math(tanh.Args(x)), backward=tanh.backward_math),
    # no row is ignored: the targets are in range, so no mask, and every row counts
    cross_entropy=SimpleNamespace(
        forward=lambda logits, targets: cross_entropy.forward_math(cross_entropy.Args(
            logits, targets, weight=None, valid=None, count=targets.shape[0], reduction="mean",
            label_smoothing=0.0)),
        backward=cross_entropy.backward_math),
)


def forward(p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor,
            k: SimpleNamespace = CHECKED) -> tuple[torch.Tensor, tuple]:
    """Returns (loss, caches). Linear weights are the notebook's (in, out) matrices transposed
    into F.linear's (out, in) layout: a view, no copy."""
    n = Xb.shape[0]
    emb, c_emb = k.embedding.forward(Xb, p["C"])  # (N, T, E)
    hprebn, c_l1 = k.linear.forward(emb.view(n, -1), p["W1"].T, p["b1"])  # (N, H)
    hpreact, c_bn = k.batch_norm.forward(hprebn, p["bngain"].view(-1), p["bnbias"].view(-1),
                                         eps=BN_EPS, correction=1)  # (N, H)
    h, c_tanh = k.tanh.forward(hpreact)  # (N, H)
    logits, c_l2 = k.linear.forward(h, p["W2"].T, p["b2"])  # (N, V)
    loss, c_ce = k.cross_entropy.forward(logits, Yb)
    return loss, (c_emb, c_l1, c_bn, c_tanh, c_l2, c_ce)


def backward(caches: tuple, k: SimpleNamespace = CHECKED) -> dict[str, torch.Tensor]:
    """d(loss)/d(every parameter), plus dlogits (exercise 2) and dhprebn (exercise 3)."""
    c_emb, c_l1, c_bn, c_tanh, c_l2, c_ce = caches
    dloss = torch.ones((), dtype=c_ce.logits.dtype, device=c_ce.logits.device)
    dlogits, _ = k.cross_entropy.backward(dloss, c_ce)  # (N, V) (softmax - onehot) / N
    dh, dW2t, db2 = k.linear.backward(dlogits, c_l2)
    (dhpreact,) = k.tanh.backward(dh, c_tanh)
    dhprebn, dbngain, dbnbias = k.batch_norm.backward(dhpreact, c_bn)  # (N, H)
    dembcat, dW1t, db1 = k.linear.backward(dhprebn, c_l1)
    n, T = c_emb.indices.shape
    _, dC = k.embedding.backward(dembcat.view(n, T, -1), c_emb)
    return {"logits": dlogits, "hprebn": dhprebn, "C": dC, "W1": dW1t.T, "b1": db1,
            "W2": dW2t.T, "b2": db2, "bngain": dbngain.view(1, -1), "bnbias": dbnbias.view(1, -1)}


# ----------------------------------------------------------------------------- the autograd twin


def batch_norm_composed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float,
                        correction: int) -> torch.Tensor:
    """The notebook's BatchNorm atoms (mean, diff, diff**2, var with 1/(N - correction), rsqrt)
    in torch ops: torch has no op for the Bessel-corrected variance."""
    mean = x.mean(0, keepdim=True)  # (1, H)
    diff = x - mean  # (N, H)
    var = (diff**2).sum(0, keepdim=True) / (x.shape[0] - correction)  # (1, H)
    return diff * (var + eps) ** -0.5 * weight + bias


def autograd_loss(p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> torch.Tensor:
    """The same forward in plain torch ops, for training with (and checking against) autograd."""
    n = Xb.shape[0]
    hprebn = p["C"][Xb].view(n, -1) @ p["W1"] + p["b1"]  # (N, H)
    hpreact = batch_norm_composed(hprebn, p["bngain"].view(-1), p["bnbias"].view(-1),
                                  eps=BN_EPS, correction=1)
    return F.cross_entropy(torch.tanh(hpreact) @ p["W2"] + p["b2"], Yb)


# ----------------------------------------------------------------------------- the trained model


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
        """The model of a state() dict, after checking that its parts fit together (ValueError)."""
        if not isinstance(state, dict):
            raise ValueError(f"expected a dict of tensors, got {type(state).__name__}")
        missing = [k for k in ("params", "bnmean", "bnvar", "chars") if k not in state]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        params, chars = state["params"], state["chars"]
        if not isinstance(params, dict) or set(params) != set(PARAM_NAMES):
            raise ValueError(f"params must hold exactly {', '.join(PARAM_NAMES)}")
        if (not isinstance(chars, (list, tuple)) or len(set(chars)) != len(chars)
                or not all(isinstance(c, str) and len(c) == 1 and c != "." and c.isprintable() for c in chars)):
            raise ValueError("chars must be distinct printable characters other than '.'")
        block_size = state.get("block_size", BLOCK_SIZE)
        if block_size != BLOCK_SIZE:
            raise ValueError(f"block_size {block_size!r}: this program samples with block_size {BLOCK_SIZE}")
        tensors = {**params, "bnmean": state["bnmean"], "bnvar": state["bnvar"]}
        if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError("every parameter and statistic must be a tensor")
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"the tensors must share one floating dtype, got {sorted(map(str, dtypes))}")
        V, E = params["C"].shape if params["C"].ndim == 2 else (-1, -1)
        H = params["b1"].shape[0] if params["b1"].ndim == 1 else -1
        expected = {"C": (len(chars) + 1, E), "W1": (block_size * E, H), "b1": (H,), "W2": (H, V),
                    "b2": (V,), "bngain": (1, H), "bnbias": (1, H), "bnmean": (1, H), "bnvar": (1, H)}
        for k, shape in expected.items():
            if tuple(tensors[k].shape) != shape or min(shape) < 1:
                raise ValueError(f"{k} has shape {tuple(tensors[k].shape)}, expected {shape} for a "
                                 f"vocabulary of {len(chars) + 1} and block_size {block_size}")
            if not bool(tensors[k].isfinite().all()):
                raise ValueError(f"{k} holds non-finite values (a diverged run?)")
        return cls(params, Vocab(tuple(chars)), state["bnmean"], state["bnvar"])


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
