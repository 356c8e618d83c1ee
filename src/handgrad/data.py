"""Read a one-item-per-line text file, build the character vocabulary and the context-window
datasets, and split them 80/10/10 as makemore does. Reference: Karpathy, makemore (MIT) and
"Building makemore Part 2: MLP" (Bengio et al. 2003 style context windows).

Blank lines (empty, or only whitespace) are skipped and counted, not refused: a trailing newline
or a stray empty line is common in hand-made lists and carries no item.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

END = "."  # the start/end token, always index 0


class DataError(ValueError):
    """A problem with the user's data file; the message is one line meant for the user."""


def default_data_path() -> Path:
    """The bundled names.txt (32,033 names, makemore, MIT licence; see data/LICENSE-names.txt)."""
    return Path(str(resources.files("handgrad") / "data" / "names.txt"))


@dataclass(frozen=True)
class Words:
    items: list[str]  # one item per non-blank line, in file order
    blank_lines: int  # how many blank lines were skipped


def read_words(path: str | Path) -> Words:
    """Read a UTF-8 file with one item per line. Windows line endings are accepted.
    Raises DataError naming the file (and line) for: missing file, not UTF-8, no items,
    an item containing the '.' token."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file with one item per line") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                        "save the file as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark is not part of the first item
    items: list[str] = []
    blank = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            blank += 1
            continue
        if END in line:
            raise DataError(f"{path}:{lineno}: item {line!r} contains {END!r}, which is reserved "
                            "as the start/end token; remove it from the data")
        items.append(line)
    if text.endswith("\n"):
        blank -= 1  # the empty string after a final newline is not a blank line
    if not items:
        raise DataError(f"{path}: no items (the file is empty or has only blank lines); "
                        "expected one item per line")
    return Words(items, blank)


# ---------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class Vocab:
    """Characters with '.' at index 0 and the others sorted from index 1."""

    itos: tuple[str, ...]

    @classmethod
    def from_words(cls, words: list[str]) -> Vocab:
        return cls((END, *sorted(set("".join(words)))))

    @property
    def stoi(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)


# ---------------------------------------------------------------------------- datasets
def build_dataset(words: list[str], block_size: int, vocab: Vocab) -> tuple[Tensor, Tensor]:
    """Every (context, next character) pair: each word is preceded by block_size '.' and
    followed by one '.'. Returns X (n, T) and Y (n,), both int64."""
    stoi = vocab.stoi
    X: list[list[int]] = []
    Y: list[int] = []
    for w in words:
        context = [0] * block_size
        for ch in w + END:
            if ch not in stoi:
                raise DataError(f"item {w!r} has character {ch!r} that is not in the vocabulary")
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X, dtype=torch.long).reshape(-1, block_size), torch.tensor(Y, dtype=torch.long)


@dataclass
class Splits:
    """The context-window datasets: 80% train, 10% val, 10% test of the shuffled words."""

    vocab: Vocab
    Xtr: Tensor  # (n_train, T)
    Ytr: Tensor  # (n_train,)
    Xdev: Tensor  # (n_val, T)
    Ydev: Tensor  # (n_val,)
    Xte: Tensor  # (n_test, T)
    Yte: Tensor  # (n_test,)

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        return {"train": (self.Xtr, self.Ytr), "val": (self.Xdev, self.Ydev),
                "test": (self.Xte, self.Yte)}[name]


def make_splits(words: list[str], block_size: int = 3, seed: int = 42,
                vocab: Vocab | None = None) -> Splits:
    """Shuffle a copy of the words with Python's random.Random(seed) (the same as the lecture's
    `random.seed(42); random.shuffle(words)`), then split at 80% and 90%."""
    vocab = vocab or Vocab.from_words(words)
    words = list(words)
    random.Random(seed).shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return Splits(vocab, *build_dataset(words[:n1], block_size, vocab),
                  *build_dataset(words[n1:n2], block_size, vocab),
                  *build_dataset(words[n2:], block_size, vocab))
