"""backprop.makemore.data: the shipped list, the vocabulary, the examples and the split."""

import os
import sys
from pathlib import Path

import pytest

from backprop.makemore import data, model

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL = os.environ.get("BACKPROP_ORIGINAL_NAMES")


def test_shipped_data():
    ds = data.load_dataset(data.DEFAULT_DATA)
    assert ds.summary() == {"words": 29910, "vocab_size": 27, "examples": [171878, 21405, 21481]}
    assert ds.words[:3] == ["emma", "olivia", "ava"]
    assert len(set(ds.words)) == len(ds.words)


def test_the_shipped_list_is_package_data_and_the_repositorys_file():
    """Read through importlib.resources (a wheel holds a copy); in a checkout it is data/names.txt,
    which data/build_names.py writes."""
    assert data.DEFAULT_DATA.read_bytes() == (ROOT / "data" / "names.txt").read_bytes()
    assert (ROOT / "backprop" / "_data" / "names.txt").resolve() == (ROOT / "data" / "names.txt").resolve()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is new in Python 3.11")
def test_the_wheel_ships_the_word_list():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "backprop*" in config["packages"]["find"]["include"]
    assert config["package-data"]["backprop._data"] == ["names.txt"]
    assert (ROOT / "backprop" / "_data" / "__init__.py").is_file()  # found by packages.find


@pytest.mark.skipif(not ORIGINAL, reason="BACKPROP_ORIGINAL_NAMES is not set")
def test_parity_with_the_seed_on_the_original_list():
    ds = data.load_dataset(ORIGINAL, split_seed=666)
    assert ds.summary() == {"words": 32033, "vocab_size": 27, "examples": [182426, 22807, 22913]}
    assert model.count_params(model.init_params(ds.vocab.size, 64)) == 4137


def test_dataset_examples_are_trigram_contexts():
    vocab = data.build_vocab(["ab"])
    X, Y = data.build_dataset(["ab"], vocab)
    assert X.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2]] and Y.tolist() == [1, 2, 0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"holds no words"),
        ("\n\n", r"holds no words"),
        ("ann\nbo.b\n", r"'\.' is the start/end symbol, found in word 'bo\.b'"),
    ],
)
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "words.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        data.read_words(path)


@pytest.mark.parametrize("n, empty", [(1, "train and val"), (3, "val"), (5, "val")])
def test_too_few_words_for_the_split(tmp_path, n, empty):
    path = tmp_path / "words.txt"
    path.write_text("".join(f"w{chr(97 + i)}\n" for i in range(n)))
    with pytest.raises(ValueError, match=f"{n} words split 80/10/10 into .* leaving the {empty} split empty"):
        data.load_dataset(path)


def test_six_words_fill_every_split(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("ab\ncd\nef\ngh\nij\nkl\n")
    assert data.load_dataset(path).summary()["examples"] == [12, 3, 3]


def test_vocabulary_comes_from_the_data(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("zoë\nanna-lee\nbob\n" * 10)
    ds = data.load_dataset(path)
    assert ds.vocab.chars == tuple(sorted(set("zoëanna-leebob")))
    assert ds.vocab.size == len(ds.vocab.chars) + 1
