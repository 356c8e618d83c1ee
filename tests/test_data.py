import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unicodedata

import pytest
import torch

from handgrad import data
from handgrad.data import DataError

LINUX_PROC = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc/self/fd")


def assert_one_clean_line(message: str) -> None:
    """A message for the user: one line, and nothing in it that a terminal would interpret."""
    assert "\n" not in message and message.isprintable(), repr(message)


def refusal(path) -> str:
    with pytest.raises(DataError) as e:
        data.read_words(path)
    assert_one_clean_line(str(e.value))
    return str(e.value)


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if a read blocks: SIGALRM interrupts a blocking open()."""
    def _timeout(signum, frame):
        raise TimeoutError("read_words blocked")
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------- the bundled data
def test_default_split_reproduces_the_lecture_sizes(names_splits):
    assert names_splits.Xtr.shape == (182_625, 3)
    assert names_splits.Xdev.shape == (22_655, 3)
    assert names_splits.Xte.shape == (22_866, 3)
    assert names_splits.Ytr.shape == (182_625,)
    assert names_splits.sizes() == {"train": 182_625, "val": 22_655, "test": 22_866}
    assert names_splits.n_items == (25_626, 3_203, 3_204)
    assert not any(names_splits.is_empty(s) for s in data.SPLITS)
    assert names_splits.why_empty("test") is None


def test_vocab_has_end_token_first_and_sorted_characters(names_splits):
    itos = names_splits.vocab.itos
    assert itos[0] == "." and len(itos) == 27
    assert list(itos[1:]) == sorted(itos[1:]) == list("abcdefghijklmnopqrstuvwxyz")


def test_bundled_names_file_is_the_documented_one():
    raw = data.default_data_path().read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
    assert (data.default_data_path().parent / "LICENSE-names.txt").is_file()


# ---------------------------------------------------------------------------- datasets
def test_context_windows_by_hand():
    vocab = data.Vocab.from_words(["ab"])  # . a b
    X, Y = data.build_dataset(["ab"], 2, vocab)
    assert X.tolist() == [[0, 0], [0, 1], [1, 2]]
    assert Y.tolist() == [1, 2, 0]
    assert X.dtype == Y.dtype == torch.long


def reference_dataset(words, block_size, stoi):
    """The lecture's algorithm as a plain loop, one example per character: the word's ids with block_size
    '.' before and one after; each id after the padding is a target, the block_size ids before it its
    context."""
    X, Y = [], []
    for w in words:
        ids = [stoi["."]] * block_size + [stoi[c] for c in w] + [stoi["."]]
        for i in range(block_size, len(ids)):
            X.append(ids[i - block_size : i])
            Y.append(ids[i])
    return X, Y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_size", range(1, 9))
def test_vectorised_dataset_equals_the_lecture_loop(seed, block_size):
    r = random.Random(seed)
    alphabet = "abcxyz é李😀-'"
    words = ["".join(r.choice(alphabet) for _ in range(r.randint(1, 12))) for _ in range(r.randint(1, 60))]
    vocab = data.Vocab.from_words(words)
    X, Y = data.build_dataset(words, block_size, vocab)
    Xr, Yr = reference_dataset(words, block_size, vocab.stoi)
    assert X.tolist() == Xr and Y.tolist() == Yr
    assert X.shape == (len(Yr), block_size) and X.dtype == Y.dtype == torch.long


def test_dataset_of_no_words_is_well_shaped():
    X, Y = data.build_dataset([], 5, data.Vocab.from_words(["a"]))
    assert X.shape == (0, 5) and Y.shape == (0,) and X.dtype == Y.dtype == torch.long


@pytest.mark.parametrize("words, expected", [
    (["ab", "a\x1bz"], r"item 'a\x1bz' has character '\x1b' that is not in the vocabulary"),
    (["ab", "a.b"], "item 'a.b' contains '.'"),
])
def test_dataset_refuses_items_the_vocabulary_cannot_encode(words, expected):
    with pytest.raises(DataError) as e:
        data.build_dataset(words, 3, data.Vocab.from_words(["ab"]))
    assert expected in str(e.value)
    assert_one_clean_line(str(e.value))


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block_size must be at least 1"):
        data.build_dataset(["ab"], 0, data.Vocab.from_words(["ab"]))


def test_split_is_seeded_and_does_not_mutate_the_input():
    words = [f"w{'abcdefghij'[i % 10]}{'abcdefghij'[i // 10 % 10]}" for i in range(100)]
    before = list(words)
    a, b = data.make_splits(words, 3, 7), data.make_splits(words, 3, 7)
    assert words == before
    assert torch.equal(a.Xtr, b.Xtr) and not torch.equal(a.Xtr, data.make_splits(words, 3, 8).Xtr)


def test_split_bounds_are_makemores_cuts_whenever_train_gets_an_item():
    for n in range(2, 500):
        assert data.split_bounds(n) == (int(0.8 * n), int(0.9 * n))
    assert data.split_bounds(1) == (1, 1)


@pytest.mark.parametrize("n, items", [
    (1, (1, 0, 0)), (2, (1, 0, 1)), (3, (2, 0, 1)), (5, (4, 0, 1)), (9, (7, 1, 1)), (10, (8, 1, 1)),
])
@pytest.mark.parametrize("block_size", [1, 3])
def test_tiny_data_always_has_a_training_split_and_well_shaped_empty_ones(n, items, block_size):
    words = ["anna", "bob", "cy", "dee", "eve", "flo", "gus", "hal", "ivy", "jo"][:n]
    s = data.make_splits(words, block_size, 42)
    assert s.n_items == items
    assert not s.is_empty("train") and s.why_empty("train") is None
    for name, count in zip(data.SPLITS, items):
        X, Y = s.split(name)
        assert X.dtype == Y.dtype == torch.long and X.shape[1] == block_size and X.shape[0] == Y.shape[0]
        assert s.is_empty(name) == (count == 0) == (s.sizes()[name] == 0)
        if count == 0:
            assert X.shape == (0, block_size) and Y.shape == (0,)
            assert s.why_empty(name) == (f"{name}: no examples (the data has only {n} items: "
                                         f"{items[0]} train, {items[1]} val, {items[2]} test)")
    assert sum(s.sizes().values()) == sum(len(w) + 1 for w in words)


def test_make_splits_of_nothing_and_unknown_split_names_are_refused():
    with pytest.raises(DataError, match="no items"):
        data.make_splits([], 3)
    with pytest.raises(ValueError, match="no split 'dev'; expected one of train, val, test"):
        data.make_splits(["ab"], 3).split("dev")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("model", ["mlp", "deep"])
def test_tiny_data_trains_and_evaluates_with_empty_splits_reported_as_none(n, model):
    """Batches are drawn with replacement, so a training split of one item (two examples) still
    fills a batch of 32; evaluating an empty split gives None, not a crash or a NaN."""
    from handgrad import models, train

    torch.set_num_threads(1)
    words = ["ab", "cde", "f", "ghij", "kl"][:n]
    s = data.make_splits(words, 3, 42)
    mcfg = models.ModelConfig(name=model, vocab_size=len(s.vocab), block_size=3, n_embd=4, n_hidden=8)
    tcfg = train.TrainConfig.for_model(model, steps=6, batch_size=32, chunk_steps=3, engine="eager")
    state = train.train(s, mcfg, tcfg)
    assert state.step == 6 and torch.isfinite(state.losses).all()
    inference = train.inference_buffers(state, s, tcfg)
    assert all(torch.isfinite(v).all() for v in inference.values())
    with torch.no_grad():
        for name in data.SPLITS:
            loss = models.evaluate(state.model, *s.split(name))
            assert (loss is None) == s.is_empty(name)
            assert loss is None or loss > 0


@pytest.mark.slow
def test_a_million_line_file_reads_and_builds_in_one_pass(tmp_path):
    """Scale, not speed (no timing asserted): a 1M-line file is read and windowed without a
    Python loop per character; every example count and a sample of windows are checked."""
    g = torch.Generator().manual_seed(0)
    letters = (torch.randint(0, 26, (6_000_000,), generator=g) + ord("a")).to(torch.uint8).numpy().tobytes().decode()
    ends = torch.cumsum(torch.randint(1, 11, (1_000_000,), generator=g), 0).tolist()  # word lengths 1-10
    words = [letters[a:b] for a, b in zip([0, *ends], ends)]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(words) + "\n")
    read = data.read_words(path)
    assert read.items == words and read.blank_lines == 0
    s = data.make_splits(read.items, 3, 42)
    assert s.n_items == (800_000, 100_000, 100_000)
    assert sum(s.sizes().values()) == sum(len(w) + 1 for w in words)
    shuffled = list(words)
    random.Random(42).shuffle(shuffled)
    stoi = s.vocab.stoi
    starts = [0, *itertools.accumulate(len(w) + 1 for w in shuffled[800_000:900_000])]  # val examples
    for k in random.Random(0).sample(range(100_000), 20):  # the windows of the k-th word of the val split
        w, start = shuffled[800_000 + k], starts[k]
        ids = [0, 0, 0] + [stoi[c] for c in w] + [0]
        assert s.Xdev[start:start + len(w) + 1].tolist() == [ids[i:i + 3] for i in range(len(w) + 1)]
        assert s.Ydev[start:start + len(w) + 1].tolist() == ids[3:]


# ---------------------------------------------------------------------------- reading files
def test_windows_line_endings_and_blank_lines(tmp_path):
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(b"anna\nbob\n")
    crlf.write_bytes(b"anna\r\n\r\n  \r\nbob\r\n\t\n\xe3\x80\x80\ncy\r")  # blank: empty, spaces, tab, U+3000
    assert data.read_words(lf) == data.Words(["anna", "bob"], 0, str(lf.resolve()))
    assert data.read_words(crlf) == data.Words(["anna", "bob", "cy"], 4, str(crlf.resolve()))


def test_printable_text_is_taken_exactly_as_written(tmp_path):
    path = tmp_path / "w.txt"
    items = ["mary ann", " lead", "trail ", "émilie", "e\u0301milie", "李", "😀", "o'neil-x"]
    path.write_bytes("\n".join(items).encode())  # no final newline
    assert data.read_words(path).items == items


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfanna\nbob\n")
    assert data.read_words(path).items == ["anna", "bob"]


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    (b"", "no items"),
    (b"\n\n", "no items"),
    (b"anna\nb\xffb\n", ":2: not valid UTF-8 (byte 0xff); save the file as UTF-8"),
    (b"anna\nbob\nbo.b\n", ":3: item 'bo.b' contains '.'"),
    (b"anna\n" + b"x" * 100 + b".\n", ":2: item 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... contains '.'"),
    ("anna\nbob\n".encode("utf-16"), "starts with a UTF-16 byte-order mark; save the file as UTF-8"),
    ("anna\nbob\n".encode("utf-16-be")[:0] + b"\xfe\xff" + "anna".encode("utf-16-be"), "UTF-16 byte-order"),
    ("anna\nbob\n".encode("utf-32"), "starts with a UTF-32 byte-order mark"),
    ("anna\nbob\n".encode("utf-16-le"), ":1: item 'a\\x00n\\x00n\\x00a\\x00' has U+0000, a control character, "
                                        "at column 2; the file looks like UTF-16, save it as UTF-8"),
    ("anna\nbob\n".encode("utf-16-be"), ":1: item '\\x00a\\x00n\\x00n\\x00a\\x00' has U+0000, a control character, "
                                        "at column 1; the file looks like UTF-16"),
    ("émilie\n".encode("utf-16-le"), ":1: not valid UTF-8 (byte 0xe9) (it looks like UTF-16)"),
])
def test_bad_data_files_get_one_line_errors_naming_file_and_line(tmp_path, content, expected):
    path = tmp_path / "words.txt"
    if content is not None:
        path.write_bytes(content)
    message = refusal(path)
    assert expected in message and message.startswith(str(path))


@pytest.mark.parametrize("ch", [
    "\x00", "\x07", "\x08", "\t", "\x0b", "\x0c", "\x1b", "\x1c", "\x7f", "\x85", "\x9b",  # Cc (C0, C1)
    "\u200b", "\u200e", "\u202e", "\u2066", "\ufeff", "\U000e0001",  # Cf: zero-width, bidi, tag
    "\ue000", "\U000f0000",  # Co: private use
    "\u0378", "\U0010ffff",  # Cn: unassigned / noncharacter
    "\u2028", "\u2029",  # Zl, Zp
    "\xa0", "\u3000", "\u2009",  # Zs other than ' '
])
def test_items_with_a_non_printable_character_are_refused_naming_line_column_and_code_point(tmp_path, ch):
    path = tmp_path / "w.txt"
    path.write_bytes(f"anna\n\nbo{ch}b\n".encode())
    message = refusal(path)
    kind = data.CATEGORY_WORDS[unicodedata.category(ch)]
    assert f"{path}:3: item {'bo' + ch + 'b'!r} has U+{ord(ch):04X}" in message
    assert f"{kind}, at column 3" in message and ch not in message


def test_an_escape_sequence_in_an_item_is_shown_escaped(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b"anna\n\x1b[31mred\n")
    assert r":2: item '\x1b[31mred' has U+001B, a control character, at column 1" in refusal(path)


@pytest.mark.parametrize("content, line", [
    (b"an\rna\n", 1),  # a lone carriage return (classic Mac line ending) is not a line break
    (b"anna\r\r\nbob\n", 1),  # only one '\r' before '\n' belongs to the line ending
])
def test_carriage_returns_only_end_lines_as_part_of_crlf(tmp_path, content, line):
    path = tmp_path / "w.txt"
    path.write_bytes(content)
    assert f":{line}: item" in refusal(path) and "U+000D" in refusal(path)


def test_a_path_with_control_characters_is_shown_escaped(tmp_path):
    path = tmp_path / "x\x1b[2J\nname.txt"
    assert refusal(path) == f"{str(path)!r}: no such file"


def test_a_directory_is_refused(tmp_path):
    message = refusal(tmp_path)
    assert message == f"{tmp_path}: is a directory, not a regular file; give the path of a text file with one item per line"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_character_device_is_refused_before_reading(no_hang):
    assert refusal("/dev/zero") == "/dev/zero: is a character device, not a regular file; save the data to a file first"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_with_no_writer_is_refused_without_blocking(tmp_path, no_hang):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert refusal(fifo) == f"{fifo}: is a FIFO (pipe), not a regular file; save the data to a file first"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_path_swapped_for_a_fifo_after_the_check_is_caught_on_the_open_file(tmp_path, monkeypatch, no_hang):
    """stat() saw a regular file, open() gets a FIFO: the open must not block and fstat() refuses."""
    fifo, regular = tmp_path / "pipe", tmp_path / "regular.txt"
    os.mkfifo(fifo)
    regular.write_text("anna\n")
    real_stat = os.stat
    monkeypatch.setattr(data.os, "stat", lambda p, *a, **k: real_stat(regular if str(p) == str(fifo) else p, *a, **k))
    assert "is a FIFO (pipe), not a regular file" in refusal(fifo)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no unix sockets")
def test_a_socket_is_refused(no_hang):
    with tempfile.TemporaryDirectory() as d:  # a short path: socket paths are limited to ~100 bytes
        path = os.path.join(d, "s")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
            assert "is a socket, not a regular file" in refusal(path)


@LINUX_PROC
def test_a_pipe_read_through_proc_fd_is_refused(no_hang):
    r, w = os.pipe()
    try:
        os.write(w, b"anna\nbob\n")
        assert "is a FIFO (pipe), not a regular file" in refusal(f"/proc/self/fd/{r}")
    finally:
        os.close(r)
        os.close(w)


@LINUX_PROC
def test_dev_stdin_from_a_pipe_is_refused_in_a_real_process(tmp_path):
    code = "import sys\nfrom handgrad import data\ntry:\n data.read_words('/dev/stdin')\nexcept data.DataError as e:\n print(e)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], input=b"anna\nbob\n", capture_output=True, env=env,
                         timeout=120)
    assert out.stdout.decode().strip() == "/dev/stdin: is a FIFO (pipe), not a regular file; save the data to a file first"


@LINUX_PROC
def test_data_redirected_from_a_file_records_the_files_real_path(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b"anna\nbob\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        words = data.read_words(f"/proc/self/fd/{fd}")  # what /dev/stdin is after `< w.txt`
    finally:
        os.close(fd)
    assert words.items == ["anna", "bob"] and words.source == str(path.resolve())
    assert data.same_data(words.source, path)


@LINUX_PROC
def test_data_that_cannot_be_found_again_by_a_path_is_refused(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b"anna\nbob\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()  # `handgrad train --data /dev/stdin < w.txt; rm w.txt` in one
        message = refusal(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    assert "cannot be found again by a path" in message and "save the data to a file first" in message


def test_a_symlink_records_the_target(tmp_path):
    target, link = tmp_path / "w.txt", tmp_path / "link.txt"
    target.write_bytes(b"anna\n")
    link.symlink_to(target)
    assert data.read_words(link).source == str(target.resolve())


def test_files_over_the_size_limit_are_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "w.txt"
    path.write_bytes(b"anna\nbob\n")  # 9 bytes
    monkeypatch.setattr(data, "MAX_DATA_BYTES", 9)
    assert data.read_words(path).items == ["anna", "bob"]
    monkeypatch.setattr(data, "MAX_DATA_BYTES", 8)
    assert "MiB handgrad reads" in refusal(path) and "use a sample of the data" in refusal(path)


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs Linux /proc")
def test_a_file_longer_than_its_reported_size_stops_at_the_limit(monkeypatch):
    """/proc files report size 0 (as a growing file may): the read itself is capped."""
    assert os.stat("/proc/self/status").st_size == 0
    monkeypatch.setattr(data, "MAX_DATA_BYTES", 16)
    assert "MiB handgrad reads" in refusal("/proc/self/status")


# ---------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("itos, expected", [
    ([".", "a", "\x1b"], r"entry 2 is '\x1b' (U+001B), not a printable character"),
    ([".", "\x1b[31m"], r"entry 1 is '\x1b[31m', not a single character"),
    ([".", "ab"], "entry 1 is 'ab', not a single character"),
    ([".", ""], "entry 1 is '', not a single character"),
    ([".", "a" * 100], "entry 1 is 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'..., not a single character"),
    ([".", 5], "entry 1 is 5, not a string"),
    ([".", None], "entry 1 is None, not a string"),
    ([".", ["a"]], "entry 1 is ['a'], not a string"),
    ([".", "\u200b"], r"entry 1 is '\u200b' (U+200B), not a printable character"),
    ([".", "\ud800"], r"entry 1 is '\ud800' (U+D800), not a printable character"),
    ([".", "\x00"], r"entry 1 is '\x00' (U+0000), not a printable character"),
    ([".", "a", "a"], "entry 2 ('a') repeats an earlier entry"),
    ([".", "a", "."], "entry 2 ('.') repeats an earlier entry"),
    ([".", "b", "a"], "entry 2 ('a') comes after 'b'; the characters after '.' must be sorted"),
    (["a", "b"], "entry 0 is 'a'; the first entry must be '.', the start/end token"),
    (["a", "."], "entry 0 is 'a'"),
    (["."], "has 1 entries; expected '.' followed by at least one character"),
    ([], "has 0 entries"),
    (".abc", "is '.abc', not a list of single characters"),
    ({".": 0, "a": 1}, "is {'.': 0, 'a': 1}, not a list of single characters"),
    (27, "is 27, not a list of single characters"),
])
def test_an_untrusted_vocabulary_is_refused_naming_where_and_the_entry_escaped(itos, expected):
    with pytest.raises(DataError) as e:
        data.Vocab.from_untrusted(itos, "run/meta.json")
    assert str(e.value).startswith(f"run/meta.json: vocabulary {expected}")
    assert_one_clean_line(str(e.value))


def test_a_vocab_cannot_be_made_with_a_non_printable_character():
    with pytest.raises(DataError, match=r"vocabulary entry 1 is '\\x1b'"):
        data.Vocab((".", "\x1b"))
    with pytest.raises(DataError, match=r"entry 1 \('\.'\) repeats"):
        data.Vocab.from_words(["a.b"])  # '.' sorts before 'a': a second '.' at index 1


def test_a_trusted_vocabulary_round_trips_through_json(names_splits):
    vocab = data.Vocab.from_words(["émilie", "李", "😀", "mary ann"])
    again = data.Vocab.from_untrusted(json.loads(json.dumps(list(vocab.itos))), "meta.json")
    assert again == vocab and again.decode(range(len(vocab))) == "".join(vocab.itos)
    assert data.Vocab.from_untrusted(list(names_splits.vocab.itos), "x") == names_splits.vocab


def test_show_escapes_and_cuts():
    assert data.show("a\x1b[31mb") == r"'a\x1b[31mb'"
    assert data.show("x" * 50, 4) == "'xxxx'..."
    assert data.show(10 ** 5000) == "<int>"  # str() of this int raises (Python's digit limit)


# ---------------------------------------------------------------------------- same_data
def test_same_data_compares_real_paths_and_none_is_the_bundled_file(tmp_path, monkeypatch):
    bundled = data.default_data_path()
    copy, link = tmp_path / "names.txt", tmp_path / "link.txt"
    shutil.copy(bundled, copy)
    link.symlink_to(copy)
    assert data.same_data(None, None) and data.same_data(None, str(bundled)) and data.same_data(bundled, None)
    assert not data.same_data(None, copy)
    assert data.same_data(link, copy) and data.same_data(str(copy), copy)
    monkeypatch.chdir(tmp_path)
    assert data.same_data("names.txt", copy) and data.same_data("./link.txt", str(copy))
    assert data.same_data("missing.txt", tmp_path / "missing.txt") and not data.same_data("missing.txt", copy)
