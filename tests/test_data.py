import hashlib

import pytest
import torch

from handgrad import data
from handgrad.data import DataError


def test_default_split_reproduces_the_lecture_sizes(names_splits):
    assert names_splits.Xtr.shape == (182_625, 3)
    assert names_splits.Xdev.shape == (22_655, 3)
    assert names_splits.Xte.shape == (22_866, 3)
    assert names_splits.Ytr.shape == (182_625,)


def test_vocab_has_end_token_first_and_sorted_characters(names_splits):
    itos = names_splits.vocab.itos
    assert itos[0] == "." and len(itos) == 27
    assert list(itos[1:]) == sorted(itos[1:]) == list("abcdefghijklmnopqrstuvwxyz")


def test_bundled_names_file_is_the_documented_one():
    raw = data.default_data_path().read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
    assert (data.default_data_path().parent / "LICENSE-names.txt").is_file()


def test_context_windows_by_hand():
    vocab = data.Vocab.from_words(["ab"])  # . a b
    X, Y = data.build_dataset(["ab"], 2, vocab)
    assert X.tolist() == [[0, 0], [0, 1], [1, 2]]
    assert Y.tolist() == [1, 2, 0]
    assert X.dtype == Y.dtype == torch.long


def test_windows_line_endings_and_blank_lines(tmp_path):
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(b"anna\nbob\n")
    crlf.write_bytes(b"anna\r\n\r\n  \r\nbob\r\n")
    assert data.read_words(lf) == data.Words(["anna", "bob"], 0)
    assert data.read_words(crlf) == data.Words(["anna", "bob"], 2)


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    (b"", "no items"),
    (b"\n\n", "no items"),
    (b"anna\nb\xffb\n", ":2: not valid UTF-8"),
    (b"anna\nbob\nbo.b\n", ":3: item 'bo.b' contains '.'"),
])
def test_bad_data_files_get_one_line_errors_naming_file_and_line(tmp_path, content, expected):
    path = tmp_path / "words.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as e:
        data.read_words(path)
    assert expected in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_split_is_seeded_and_does_not_mutate_the_input():
    words = [f"w{'abcdefghij'[i % 10]}{'abcdefghij'[i // 10 % 10]}" for i in range(100)]
    before = list(words)
    a, b = data.make_splits(words, 3, 7), data.make_splits(words, 3, 7)
    assert words == before
    assert torch.equal(a.Xtr, b.Xtr) and not torch.equal(a.Xtr, data.make_splits(words, 3, 8).Xtr)
