"""The words, their vocabulary, and the notebook's (context, next character) examples.

Shapes: N examples, T = block_size context characters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

# data/names.txt, shipped inside the package (backprop/_data/names.txt links to it)
DEFAULT_DATA = resources.files("backprop._data") / "names.txt"
BLOCK_SIZE = 3
SPLIT_SEED = 666
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Vocab:
    chars: tuple[str, ...]  # sorted characters of the data; '.' (index 0) is start/end

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    @property
    def stoi(self) -> dict[str, int]:
        return {".": 0} | {ch: i + 1 for i, ch in enumerate(self.chars)}

    @property
    def itos(self) -> dict[int, str]:
        return {i: s for s, i in self.stoi.items()}


def read_words(path: str | Path | resources.abc.Traversable) -> list[str]:
    """One word per line; blank lines are skipped, a UTF-8 byte order mark is dropped. Raises
    ValueError on an unusable file: missing, a directory, unreadable, not UTF-8, no words, a word
    holding '.' (the start/end symbol) or a non-printable character (a control character would
    reach the terminal raw when sampled)."""
    path = Path(path) if isinstance(path, str) else path
    if isinstance(path, Path) and path.is_dir():
        raise ValueError(f"data file {str(path)!r} is a directory (expected a file, one word per line)")
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM is not a vocabulary character
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise ValueError(f"data file {str(path)!r} cannot be read: {e.strerror or e}") from None
    words = [w.strip() for w in text.splitlines() if w.strip()]
    if not words:
        raise ValueError(f"data file {str(path)!r} holds no words (expected one word per line)")
    if any("." in w for w in words):
        bad = next(w for w in words if "." in w)
        raise ValueError(f"data file {str(path)!r}: '.' is the start/end symbol, found in word {bad!r}")
    for w in words:
        if not w.isprintable():
            ch = next(c for c in w if not c.isprintable())
            raise ValueError(f"data file {str(path)!r}: word {w!r} holds the non-printable character "
                             f"U+{ord(ch):04X}; words must be printable text")
    return words


def build_vocab(words: list[str]) -> Vocab:
    return Vocab(tuple(sorted(set("".join(words)))))


def build_dataset(words: list[str], vocab: Vocab,
                  block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Every character of word + '.' is a target; its context is the block_size before it.
    Returns X (N, T) and Y (N,), int64."""
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
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # train / val / test: (X (N, T), Y (N,))

    def summary(self) -> dict:
        return {
            "words": len(self.words),
            "vocab_size": self.vocab.size,
            "examples": [int(self.splits[k][0].shape[0]) for k in SPLITS],
        }


def load_dataset(path: str | Path | resources.abc.Traversable = DEFAULT_DATA,
                 split_seed: int = SPLIT_SEED) -> Dataset:
    """Shuffle the words with random.seed(split_seed) and split 80% / 10% / 10%, as the seed does."""
    words = read_words(path)
    vocab = build_vocab(words)
    shuffled = list(words)
    random.Random(split_seed).shuffle(shuffled)  # the same order as random.seed(s); random.shuffle
    n1, n2 = int(0.8 * len(shuffled)), int(0.9 * len(shuffled))
    parts = dict(zip(SPLITS, (shuffled[:n1], shuffled[n1:n2], shuffled[n2:])))
    empty = [k for k, v in parts.items() if not v]
    if empty:  # training and evaluation need every split (6 words is the least that fills them)
        sizes = " / ".join(str(len(v)) for v in parts.values())
        raise ValueError(f"{path}: {len(words)} words split 80/10/10 into {sizes} words, leaving the "
                         f"{' and '.join(empty)} split empty; give at least 6 words")
    return Dataset(words, vocab, {k: build_dataset(v, vocab) for k, v in parts.items()})
