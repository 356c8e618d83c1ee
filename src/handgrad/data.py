"""Read a one-item-per-line text file, build the character vocabulary and the context-window
datasets, and split them 80/10/10 as makemore does. Reference: Karpathy, makemore (MIT) and
"Building makemore Part 2: MLP" (Bengio et al. 2003 style context windows).

What a data file may hold (every refusal is a one-line DataError naming the file and line):
- a regular file only, read once and at most MAX_DATA_BYTES; a directory, FIFO, device or socket
  (`/dev/zero`, a pipe behind `/dev/stdin`) is refused before anything is read from it. /dev/stdin
  redirected from a file (`--data /dev/stdin < names.txt`) is that file, and its real path is what
  is recorded; a pipe is refused because eval and --resume must be able to read the data again;
- UTF-8 text; a leading UTF-8 byte-order mark is dropped; UTF-16/32 (with or without a BOM) is refused;
- one item per line, taken exactly as written (inner and outer spaces are characters of the item);
  '\\n' or '\\r\\n' ends a line; blank lines (empty, or only whitespace) are skipped and counted;
- items of printable characters only (`str.isprintable()`: no control, format, private-use,
  unassigned or separator characters other than ' '), and never '.', the start/end token.
The same printability rule holds for every Vocab, so a model can only ever sample printable text.
"""

from __future__ import annotations

import os
import random
import stat
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from handgrad.config import ConfigError, ref

END = "."  # the start/end token, always index 0
SPLITS = ("train", "val", "test")
# Each character of the file becomes one training example of block_size + 1 int64 values held in
# memory: 64 MiB of names is about 67 million examples, 2.1 GB of tensors at block_size 3.
MAX_DATA_BYTES = 64 * 2**20


class DataError(ValueError):
    """A problem with the user's data (or a vocabulary); the message is one line meant for the user."""


def default_data_path() -> Path:
    """The bundled names.txt (32,033 names, makemore, MIT licence; see data/LICENSE-names.txt)."""
    return Path(str(resources.files("handgrad") / "data" / "names.txt"))


def show(value: object, limit: int = 40) -> str:
    """A value for a one-line message: repr() escapes every non-printable character (an ESC
    becomes '\\x1b'), so crafted text cannot drive the user's terminal; long values are cut."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (Python's digit limit)
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def show_path(path: str | os.PathLike) -> str:
    """A path as written when it is printable and non-empty, escaped otherwise."""
    text = os.fspath(path)
    return text if text and text.isprintable() else repr(text)


def same_data(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two data paths name the same file; None means the bundled names.txt."""
    pa, pb = (os.fspath(default_data_path() if x is None else x) for x in (a, b))
    try:
        return os.path.samefile(pa, pb)
    except OSError:  # one of them is missing: compare what the paths resolve to
        return os.path.realpath(pa) == os.path.realpath(pb)


# ---------------------------------------------------------------------------- reading a file
# Why a file that is not a regular file is refused, by its stat type, and what to do instead.
NOT_REGULAR = (
    (stat.S_ISDIR, "a directory", "give the path of a text file with one item per line"),
    (stat.S_ISFIFO, "a FIFO (pipe)", "save the data to a file first"),
    (stat.S_ISCHR, "a character device", "save the data to a file first"),
    (stat.S_ISBLK, "a block device", "save the data to a file first"),
    (stat.S_ISSOCK, "a socket", "save the data to a file first"),
)
# The byte-order marks of encodings that are not UTF-8 (UTF-32 LE first: it starts like UTF-16 LE).
FOREIGN_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
# What a non-printable character is, by Unicode general category.
CATEGORY_WORDS = {"Cc": "a control character", "Cf": "an invisible format character", "Cs": "a surrogate",
                  "Co": "a private-use character", "Cn": "an unassigned code point",
                  "Zl": "a line separator", "Zp": "a paragraph separator", "Zs": "a space other than ' '"}


@dataclass(frozen=True)
class Words:
    items: list[str]  # one item per non-blank line, in file order
    blank_lines: int  # how many blank lines were skipped
    source: str = ""  # the file's real path: the path to record so that eval/--resume can reopen it


def _refuse_unless_regular(path: str, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    what, advice = "not a regular file", "save the data to a file first"
    for is_kind, kind, kind_advice in NOT_REGULAR:
        if is_kind(st.st_mode):
            what, advice = kind, kind_advice
    raise DataError(f"{show_path(path)}: is {what}, not a regular file; {advice}")


def _too_big(path: str, size: int) -> DataError:
    return DataError(f"{show_path(path)}: is {size / 2**20:.0f} MiB, more than the {MAX_DATA_BYTES // 2**20} "
                     "MiB handgrad reads (every character becomes a training example held in memory); "
                     "use a sample of the data")


def _read_regular_file(path: str) -> tuple[bytes, str]:
    """The bytes of a regular file and its real path. The type is checked with stat() before the
    file is opened (opening a FIFO blocks, reading /dev/zero never ends) and again with fstat() on
    the open descriptor, in case the path was swapped in between (O_NONBLOCK keeps that open from
    blocking)."""
    try:
        _refuse_unless_regular(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{show_path(path)}: no such file") from None
    except OSError as e:
        raise DataError(f"{show_path(path)}: cannot read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _refuse_unless_regular(path, st)
        if st.st_size > MAX_DATA_BYTES:
            raise _too_big(path, st.st_size)
        try:
            raw = f.read(MAX_DATA_BYTES + 1)  # a file that grows while being read stops here
        except OSError as e:
            raise DataError(f"{show_path(path)}: cannot read ({e.strerror})") from None
    if len(raw) > MAX_DATA_BYTES:
        raise _too_big(path, len(raw))
    real = os.path.realpath(path)
    try:
        again = os.stat(real)
    except OSError:
        again = None
    if again is None or (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        raise DataError(f"{show_path(path)}: the file it opens cannot be found again by a path (it resolves "
                        f"to {show(real, 80)}), so eval and --resume could not reread it; save the data "
                        "to a file first")
    return raw, real


def _looks_like_utf16(raw: bytes) -> bool:
    """ASCII text in UTF-16 without a byte-order mark: about every other byte is 0."""
    return len(raw) >= 2 and raw.count(0) * 3 >= len(raw)


def _decode(path: str, raw: bytes) -> str:
    for bom, encoding in FOREIGN_BOMS:
        if raw.startswith(bom):
            raise DataError(f"{show_path(path)}: starts with a {encoding} byte-order mark; save the file as "
                            "UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if _looks_like_utf16(raw) else ""
        raise DataError(f"{show_path(path)}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}){hint}; "
                        "save the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text  # a UTF-8 BOM is not part of the first item


def _bad_char_error(path: str, lineno: int, item: str, raw: bytes) -> DataError:
    """The message for the first character of item that no item may hold."""
    col, ch = next((i, c) for i, c in enumerate(item, start=1) if c == END or not c.isprintable())
    where = f"{show_path(path)}:{lineno}:"
    if ch == END:
        return DataError(f"{where} item {show(item)} contains {END!r}, which is reserved as the start/end "
                         "token; remove it from the data")
    name = unicodedata.name(ch, "")
    kind = CATEGORY_WORDS.get(unicodedata.category(ch), "a non-printable character")
    hint = ("; the file looks like UTF-16, save it as UTF-8" if ch == "\x00" and _looks_like_utf16(raw)
            else "; items must be printable text")
    return DataError(f"{where} item {show(item)} has U+{ord(ch):04X}{f' ({name})' if name else ''}, {kind}, "
                     f"at column {col}{hint}")


def read_words(path: str | os.PathLike) -> Words:
    """Read a UTF-8 file with one item per line (the rules are in the module docstring).
    Raises DataError naming the file (and line) for: missing file, not a regular file, too big,
    not UTF-8, no items, an item with a non-printable character or the '.' token."""
    path = os.fspath(path)
    raw, real = _read_regular_file(path)
    text = _decode(path, raw)
    lines = text.split("\n")  # (only '\n' ends a line: '\x0b', '\x1c', U+2028... are refused in items)
    if text.endswith("\n"):
        lines.pop()  # the empty string after a final newline is not a line
    if "\r" in text:
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    items = [line for line in lines if line.strip()]
    # Check the alphabet once (fast); find the line only when something is wrong.
    if any(c == END or not c.isprintable() for c in set("".join(items))):
        lineno, item = next((i, line) for i, line in enumerate(lines, start=1) if line.strip()
                            and (END in line or not line.isprintable()))
        raise _bad_char_error(path, lineno, item, raw)
    if not items:
        raise DataError(f"{show_path(path)}: no items (the file is empty or has only blank lines); "
                        "expected one item per line")
    return Words(items, len(lines) - len(items), real)


# ---------------------------------------------------------------------------- vocabulary
def vocab_problem(itos: object) -> str | None:
    """What is wrong with a vocabulary, or None: it must be a list of single printable characters,
    '.' first, the others distinct and sorted by code point (as Vocab.from_words builds it)."""
    if not isinstance(itos, (list, tuple)):
        return f"is {show(itos)}, not a list of single characters"
    if len(itos) < 2:
        return f"has {len(itos)} entries; expected {END!r} followed by at least one character"
    for i, ch in enumerate(itos):
        if not isinstance(ch, str):
            return f"entry {i} is {show(ch)}, not a string"
        if len(ch) != 1:
            return f"entry {i} is {show(ch)}, not a single character"
        if not ch.isprintable():
            return f"entry {i} is {show(ch)} (U+{ord(ch):04X}), not a printable character"
    if itos[0] != END:
        return f"entry 0 is {show(itos[0])}; the first entry must be {END!r}, the start/end token"
    for i in range(1, len(itos)):
        if itos[i] == END or (i > 1 and itos[i] == itos[i - 1]):  # sorted, so a repeat is adjacent
            return f"entry {i} ({show(itos[i])}) repeats an earlier entry"
        if i > 1 and itos[i] < itos[i - 1]:
            return (f"entry {i} ({show(itos[i])}) comes after {show(itos[i - 1])}; the characters after "
                    f"{END!r} must be sorted")
    return None


@dataclass(frozen=True)
class Vocab:
    """Characters with '.' at index 0 and the others sorted from index 1. Every Vocab is checked
    when made (vocab_problem), so decode can only produce printable text."""

    itos: tuple[str, ...]

    def __post_init__(self) -> None:
        problem = vocab_problem(self.itos)
        if problem is not None:
            raise DataError(f"vocabulary {problem}")

    @classmethod
    def from_words(cls, words: list[str]) -> Vocab:
        return cls((END, *sorted(set("".join(words)))))

    @classmethod
    def from_untrusted(cls, itos: object, where: str) -> Vocab:
        """A vocabulary read from a file (a checkpoint's meta.json): a DataError naming `where`
        and showing the bad entry escaped, never raw."""
        problem = vocab_problem(itos)
        if problem is not None:
            raise DataError(f"{where}: vocabulary {problem}")
        return cls(tuple(itos))  # type: ignore[arg-type]  # checked by vocab_problem

    @property
    def stoi(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)


# ---------------------------------------------------------------------------- datasets
def encode(text: str, vocab: Vocab) -> Tensor:
    """Token ids of every character of text, (len(text),) int64; -1 where a character is not in
    the vocabulary. Vectorised: code points via UTF-32, then one table lookup."""
    cps = torch.from_numpy(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64))
    vocab_cps = torch.tensor([ord(ch) for ch in vocab.itos], dtype=torch.long)  # (V,)
    size = int(max(vocab_cps.max().item(), cps.max().item() if len(cps) else 0)) + 1
    table = torch.full((size,), -1, dtype=torch.long)  # code point -> token id
    table[vocab_cps] = torch.arange(len(vocab.itos))
    return table[cps]


def build_dataset(words: list[str], block_size: int, vocab: Vocab) -> tuple[Tensor, Tensor]:
    """Every (context, next character) pair: each word is preceded by block_size '.' and
    followed by one '.'. Returns X (n, T) and Y (n,), both int64; n = sum(len(w) + 1).

    Built without a Python loop per character: Y is the ids of "w1.w2.w3." and the contexts are
    windows of the sequence in which block_size '.' (id 0) precede every word."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    T = block_size
    if not words:
        return torch.zeros((0, T), dtype=torch.long), torch.zeros((0,), dtype=torch.long)
    text = END.join(words) + END
    Y = encode(text, vocab)  # (n,)
    if (Y < 0).any():
        i = int(torch.nonzero(Y < 0)[0, 0])
        raise DataError(f"item {show(text[:i].rsplit(END, 1)[-1] + text[i:].split(END, 1)[0])} has "
                        f"character {show(text[i])} that is not in the vocabulary")
    ends = Y == 0  # (n,) True at the '.' that closes each word
    if int(ends.sum()) != len(words):
        w = next(w for w in words if END in w)
        raise DataError(f"item {show(w)} contains {END!r}, which is reserved as the start/end token")
    word = torch.cumsum(ends, 0) - ends.long()  # (n,) which word each target belongs to
    pos = torch.arange(Y.shape[0]) + T * (word + 1)  # (n,) where each target sits in the padded sequence
    padded = torch.zeros(Y.shape[0] + T * len(words), dtype=torch.long)  # '.'*T w1 . '.'*T w2 . ...
    padded[pos] = Y
    X = padded.unfold(0, T, 1).index_select(0, pos - T)  # (n, T) the T ids before each target
    return X, Y


def split_bounds(n: int) -> tuple[int, int]:
    """Where the shuffled items are cut: train [0, n1), val [n1, n2), test [n2, n). The cuts are
    makemore's int(0.8n) and int(0.9n), except that train always gets at least one item, so with
    1 item val and test are empty, and with 2-9 items val is empty."""
    n1 = max(int(0.8 * n), 1)
    return n1, max(int(0.9 * n), n1)


@dataclass
class Splits:
    """The context-window datasets: 80% train, 10% val, 10% test of the shuffled words
    (split_bounds). Train is never empty; val and test may be, on tiny data."""

    vocab: Vocab
    Xtr: Tensor  # (n_train, T)
    Ytr: Tensor  # (n_train,)
    Xdev: Tensor  # (n_val, T)
    Ydev: Tensor  # (n_val,)
    Xte: Tensor  # (n_test, T)
    Yte: Tensor  # (n_test,)
    n_items: tuple[int, int, int]  # items (words) in train, val, test

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """(X, Y) of "train", "val" or "test"; an empty split is (0, T) and (0,)."""
        pairs = {"train": (self.Xtr, self.Ytr), "val": (self.Xdev, self.Ydev), "test": (self.Xte, self.Yte)}
        if name not in pairs:
            raise ValueError(f"no split {name!r}; expected one of {', '.join(SPLITS)}")
        return pairs[name]

    def sizes(self) -> dict[str, int]:
        """Examples per split."""
        return {name: self.split(name)[1].shape[0] for name in SPLITS}

    def is_empty(self, name: str) -> bool:
        return self.split(name)[1].shape[0] == 0

    def why_empty(self, name: str) -> str | None:
        """None when the split has examples; otherwise a sentence for the user, such as
        "val: no examples (the data has only 3 items: 3 train, 0 val, 0 test)"."""
        if not self.is_empty(name):
            return None
        counts = ", ".join(f"{n} {s}" for n, s in zip(self.n_items, SPLITS))
        return f"{name}: no examples (the data has only {sum(self.n_items)} items: {counts})"


def make_splits(words: list[str], block_size: int = 3, seed: int = 42,
                vocab: Vocab | None = None) -> Splits:
    """Shuffle a copy of the words with Python's random.Random(seed) (the same as the lecture's
    `random.seed(42); random.shuffle(words)`), then cut at split_bounds (80% and 90%)."""
    if not words:
        raise DataError("no items to split; expected at least one")
    vocab = vocab or Vocab.from_words(words)
    words = list(words)
    random.Random(seed).shuffle(words)
    n1, n2 = split_bounds(len(words))
    return Splits(vocab, *build_dataset(words[:n1], block_size, vocab),
                  *build_dataset(words[n1:n2], block_size, vocab),
                  *build_dataset(words[n2:], block_size, vocab),
                  n_items=(n1, n2 - n1, len(words) - n2))


# ---------------------------------------------------------------------------- whole words as sequences
IGNORE = -1  # a target position after a word's end token: not counted in the loss (ops.IGNORE)
TEST_ITEMS = 1000  # makemore's test set: min(1000, 10% of the items)


def sequence_problem(words: list[str], block_size: int) -> str | None:
    """Why the words do not fit sequences of block_size positions (a start token, then each
    character), or None."""
    longest = max(words, key=len, default="")
    if len(longest) + 1 <= block_size:
        return None
    return (f"item {show(longest)} has {len(longest)} characters, and a sequence of {ref('block_size')} "
            f"{block_size} holds a start token and at most {block_size - 1}; give {ref('block_size')} "
            f"{len(longest) + 1} or more")


def build_sequences(words: list[str], block_size: int, vocab: Vocab) -> tuple[Tensor, Tensor]:
    """makemore's CharDataset, all words at once: x = [0, c1 .. cL, 0 ...] and y = [c1 .. cL, 0, -1 ...]
    (the next character at each position, the end token after the last, then IGNORE), each of
    block_size positions. Returns X (n, T) and Y (n, T), int64."""
    T = block_size
    X = torch.zeros((len(words), T), dtype=torch.long)  # (n, T)
    Y = torch.full((len(words), T), IGNORE, dtype=torch.long)  # (n, T)
    if not words:
        return X, Y
    problem = sequence_problem(words, T)
    if problem is not None:
        raise ConfigError(problem)
    text = "".join(words)
    ids = encode(text, vocab)  # (characters,)
    if (ids < 0).any():
        i = int(torch.nonzero(ids < 0)[0, 0])
        raise DataError(f"character {show(text[i])} is not in the vocabulary")
    lengths = torch.tensor([len(w) for w in words], dtype=torch.long)  # (n,)
    row = torch.repeat_interleave(torch.arange(len(words)), lengths)  # (characters,) its word
    col = torch.arange(ids.shape[0]) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    X[row, col + 1] = ids  # the start token at 0, then the characters
    Y[row, col] = ids
    Y[torch.arange(len(words)), lengths] = 0  # the end token after the last character
    return X, Y


def make_sequences(words: list[str], block_size: int = 16, seed: int = 3407,
                   vocab: Vocab | None = None) -> Splits:
    """makemore's split: torch.randperm(n) from a generator seeded `seed` orders the items, the last
    min(1000, n // 10) are the test set, the rest train; no val split. With makemore's seed 3407 on
    names.txt this is makemore's own split (31,033 train, 1,000 test names)."""
    if not words:
        raise DataError("no items to split; expected at least one")
    vocab = vocab or Vocab.from_words(words)
    problem = sequence_problem(words, block_size)  # before anything is built
    if problem is not None:
        raise ConfigError(problem)
    n_test = min(TEST_ITEMS, int(len(words) * 0.1))
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed)).tolist()
    train = [words[i] for i in order[:len(words) - n_test]]
    test = [words[i] for i in order[len(words) - n_test:]]
    return Splits(vocab, *build_sequences(train, block_size, vocab), *build_sequences([], block_size, vocab),
                  *build_sequences(test, block_size, vocab), n_items=(len(train), 0, len(test)))


# The kinds of data a model reads, by name (models.Preset.data): how the items become its splits.
KINDS = {"context": make_splits,  # (N, T) contexts of block_size characters -> (N,) next characters
         "sequence": make_sequences}  # (N, T) start token + word -> (N, T) next characters, IGNORE after
