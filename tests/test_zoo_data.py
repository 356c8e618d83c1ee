"""The sequence data kind (data.make_sequences): makemore's split of names.txt (31,033 train, 1,000
test names from torch.randperm after seed 3407), x = [0, chars...] and y = [chars..., 0, -1...], and
a word too long for the block size refused in one line naming the flag."""

from __future__ import annotations

import pytest
import torch

from handgrad import data
from handgrad.config import ConfigError
from handgrad.run import load_splits


@pytest.fixture(scope="module")
def names():
    return data.read_words(data.default_data_path()).items


def test_makemore_split_of_names(names):
    s = data.make_sequences(names, 16, 3407)
    assert s.n_items == (31_033, 0, 1_000)
    assert s.Xtr.shape == (31_033, 16) and s.Xte.shape == (1_000, 16) and s.Xdev.shape == (0, 16)
    with torch.random.fork_rng():  # makemore: torch.manual_seed(3407), then torch.randperm(len(words))
        torch.manual_seed(3407)
        order = torch.randperm(len(names)).tolist()
    test_words = [names[i] for i in order[-1000:]]
    assert [s.vocab.decode(row[1:].tolist()).rstrip(".") for row in s.Xte[:50]] == test_words[:50]
    assert s.vocab.decode(s.Xtr[0, 1:].tolist()).rstrip(".") == names[order[0]]


def test_sequences_are_start_token_chars_then_end_and_ignore():
    vocab = data.Vocab.from_words(["ab", "c"])
    X, Y = data.build_sequences(["ab", "c", "cab"], 5, vocab)
    assert X.tolist() == [[0, 1, 2, 0, 0], [0, 3, 0, 0, 0], [0, 3, 1, 2, 0]]
    assert Y.tolist() == [[1, 2, 0, -1, -1], [3, 0, -1, -1, -1], [3, 1, 2, 0, -1]]


def test_a_word_filling_the_block_exactly_fits():
    vocab = data.Vocab.from_words(["abc"])
    X, Y = data.build_sequences(["abc"], 4, vocab)
    assert X.tolist() == [[0, 1, 2, 3]] and Y.tolist() == [[1, 2, 3, 0]]


def test_a_word_longer_than_the_block_is_refused_naming_the_flag():
    with pytest.raises(ConfigError) as e:
        data.make_sequences(["ab", "abcdef"], 6, 1)
    line = e.value.render(lambda f: "--" + f.replace("_", "-"))
    assert "\n" not in line and "'abcdef'" in line and "--block-size 7" in line


def test_small_data_keeps_a_train_split_and_a_tenth_for_test():
    s = data.make_sequences([f"w{'a' * i}" for i in range(25)], 30, 0)
    assert s.n_items == (23, 0, 2)
    s = data.make_sequences(["one"], 4, 0)
    assert s.n_items == (1, 0, 0) and s.Xte.shape == (0, 4)


def test_load_splits_reads_the_sequence_kind(names):
    s = load_splits(None, 16, 3407, kind="sequence")
    assert s.n_items == (31_033, 0, 1_000) and len(s.vocab) == 27
