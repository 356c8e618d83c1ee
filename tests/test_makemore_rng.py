"""makemore_rng (the zoo's default): a zoo run draws its init, its batches and its evaluations' shuffles
as makemore.py does, so that it reproduces makemore.py's own run. Compared with makemore_replica, a
plain-PyTorch replica of makemore.py's loop (nn modules, autograd, torch.optim.AdamW, DataLoader)."""

from __future__ import annotations

import json

import pytest
import torch

import makemore_replica as R
from handgrad import checkpoint, data, makemore, models, train
from handgrad.cli import main
from handgrad.config import ConfigError
from handgrad.layers import Linear
from handgrad.train import TrainConfig

ZOO = ("bigram", "bow", "bengio", "rnn", "gru", "transformer")
SMALL = {"n_embd": 12, "n_embd2": 20, "n_head": 3, "n_layers": 2}  # sizes with no two equal dimensions
REPLICA = {"n_embd": 12, "n_embd2": 20, "n_head": 3, "n_layer": 2}


@pytest.fixture(scope="module")
def words() -> list[str]:
    return data.read_words(data.default_data_path()).items


@pytest.mark.parametrize("fan_in,fan_out,seed", [(48, 64, 0), (64, 27, 5), (1024, 64, 3407), (7, 3, 11)])
def test_a_torch_init_linear_draws_nn_linears_numbers(fan_in, fan_out, seed):
    """Linear(init="torch") from Generator(seed) equals nn.Linear after torch.manual_seed(seed), bit for
    bit (its weight is (in, out), nn.Linear's (out, in)); float64 layers take the same float32 draws."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref = torch.nn.Linear(fan_in, fan_out)
    for dtype in (torch.float32, torch.float64):
        ours = Linear(fan_in, fan_out, init="torch", dtype=dtype)
        ours.init_(torch.Generator().manual_seed(seed))
        assert torch.equal(ours.weight, ref.weight.detach().T.to(dtype))
        assert torch.equal(ours.bias, ref.bias.detach().to(dtype))


def _zoo_state(name: str, words: list[str], dtype: str = "float32", **sizes):
    mcfg = models.preset(name, **{**SMALL, **sizes}, vocab_size=27)
    tcfg = TrainConfig.for_model(name, dtype=dtype)
    return mcfg, tcfg, train.new_state(mcfg, tcfg, len(words))


def _same(p: torch.Tensor, q: torch.Tensor) -> bool:
    """p equals q, or q transposed (a weight in nn.Linear's (out, in) layout)."""
    return torch.equal(p, q) or (q.dim() == 2 and q.shape == p.shape[::-1] and torch.equal(p, q.T))


def _unmatched(ours: dict, ref: torch.nn.Module) -> list[str]:
    """Our non-zero parameters with no equal replica parameter, each replica parameter used once."""
    pool = [p.detach() for p in ref.parameters()]
    missing = []
    for name, p in ours.items():
        if not p.abs().sum() > 0:
            continue
        hit = next((i for i, q in enumerate(pool) if _same(p, q)), None)
        if hit is None:
            missing.append(name)
        else:
            pool.pop(hit)
    return missing


@pytest.mark.parametrize("name", ZOO)
def test_the_init_is_makemores(name, words):
    """Every non-zero parameter of the zoo model's init equals the replica's (after makemore's shuffle of
    the words from the same global generator), and there are as many numbers."""
    mcfg, tcfg, state = _zoo_state(name, words)
    with torch.random.fork_rng():
        torch.manual_seed(tcfg.seed)
        torch.randperm(len(words))
        ref = R.MODELS[name](27, 16, 12, 20, 3, 2)
    assert sum(p.numel() for p in state.model.params().values()) == sum(p.numel() for p in ref.parameters())
    assert _unmatched(state.model.params(), ref) == []
    nonzero = [n for n, p in state.model.params().items() if p.abs().sum() > 0]
    assert nonzero or name == "bigram"  # the test compares numbers, not only zeros


def test_another_seed_or_no_makemore_rng_gives_another_init(words):
    _, _, a = _zoo_state("bow", words)
    mcfg = models.preset("bow", **SMALL, vocab_size=27)
    b = train.new_state(mcfg, TrainConfig.for_model("bow", seed=1), len(words))
    c = train.new_state(mcfg, TrainConfig.for_model("bow", makemore_rng=False), len(words))
    for other in (b, c):
        assert not torch.equal(a.model.params()["0.weight"], other.model.params()["0.weight"])


def test_new_state_needs_the_number_of_items():
    mcfg = models.preset("bow", **SMALL, vocab_size=27)
    with pytest.raises(ValueError, match="number of items"):
        train.new_state(mcfg, TrainConfig.for_model("bow"))


def test_chunks_end_where_makemores_loop_evaluates():
    t = TrainConfig.for_model("bow", steps=1200, chunk_steps=500, eval_every=300)
    ends, s = [], 0
    while s < t.steps:
        s = train.chunk_end(t, s)
        ends.append(s)
    assert ends == [1, 301, 501, 601, 901, 1001, 1200]  # after 1 + multiples of 300 and of 500 updates
    lecture = TrainConfig.for_model("mlp", steps=1200, chunk_steps=500)
    assert [train.chunk_end(lecture, s) for s in (0, 500, 1000)] == [500, 1000, 1200]


def _loader_orders(seed: int, steps: int, every: int, V: int, T: int, sizes=(50, 30)) -> list[list[int]]:
    """The orders in which makemore's loop visits its two splits at each evaluation, with samples drawn
    between them, from a global generator seeded `seed` (the init and the training loader done)."""
    orders = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probs = torch.softmax(torch.randn(10, V), -1)
        for i in range(steps):
            if makemore.is_eval(i, every):
                for n in sizes:
                    orders.append(next(iter(torch.utils.data.DataLoader(list(range(n)), shuffle=True,
                                                                        batch_size=n))).tolist())
            if i > 0 and i % 200 == 0:
                for _ in range(T - 1):
                    torch.multinomial(probs, num_samples=1)
    return orders


@pytest.mark.parametrize("every,done", [(500, 0), (100, 0), (100, 650), (300, 1201)])
def test_the_eval_stream_shuffles_as_makemores_dataloaders(every, done):
    """EvalStream's shuffles equal the DataLoaders' of a loop that also draws samples every 200 steps
    (randn for the probabilities is drawn first in both), also when it starts from a resumed step."""
    steps, V, T = 2000, 27, 16
    expect = _loader_orders(7, steps, every, V, T)
    g = torch.Generator().manual_seed(7)
    torch.randn(10, V, generator=g)
    stream = makemore.EvalStream(g, V, T, every, done)
    orders = []  # (split, rows): splits of 50 and 30 rows are one batch of 100 each
    for i in range(done, steps):
        if makemore.is_eval(i, every):
            stream.evaluate(lambda split, rows: orders.append((split, rows.tolist())) or 0.0, 50, 30, i + 1)
    skipped = sum(2 for i in range(done) if makemore.is_eval(i, every))
    assert len(orders) >= 4
    assert [rows for _, rows in orders] == expect[skipped:]
    assert [split for split, _ in orders] == ["train", "test"] * (len(orders) // 2)


def test_an_evaluation_reads_the_first_10_batches_of_100_of_the_shuffle():
    """A split of 2,550 rows: loss() sees 10 batches of 100 rows, the first 1,000 of the DataLoader's
    order, and the result is the mean of their losses (a split of 150: one batch of 100 and one of 50)."""
    g = torch.Generator().manual_seed(3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        order = next(iter(torch.utils.data.DataLoader(list(range(2550)), shuffle=True, batch_size=2550)))
    seen = {"train": [], "test": []}

    def loss(split, rows):
        seen[split].append(rows.tolist())
        return float(len(seen[split]))  # 1, 2, ... 10: the mean is 5.5

    # the first evaluation of every 100 steps: no samples were drawn before it (the first come at 200)
    train_loss, test_loss = makemore.EvalStream(g, 27, 16, 100).evaluate(loss, 2550, 150, 101)
    assert [len(b) for b in seen["train"]] == [100] * 10 and [len(b) for b in seen["test"]] == [100, 50]
    assert sum(seen["train"], []) == order[:1000].tolist()
    assert (train_loss, test_loss) == (5.5, 1.5)


def test_the_stream_refuses_a_step_that_is_not_an_evaluation():
    stream = makemore.EvalStream(torch.Generator().manual_seed(0), 27, 16, 500)
    with pytest.raises(ValueError, match="not the next evaluation"):
        stream.evaluate(lambda s, r: 0.0, 10, 10, 500)  # makemore evaluates after 501 updates


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("gru", "bengio") else n
                                  for n in ZOO])
def test_a_zoo_run_reproduces_makemores_run(name, words, tmp_path):
    """`handgrad train --model M` (small sizes) and the replica of makemore.py's loop: the same first
    batches, per-step training losses within float32 rounding over 650 steps, and the same evaluations
    (makemore's evaluate(), after 101, 201, ... updates), both to 1e-5 (float32 rounding: about 1e-6 measured)."""
    steps, every = 650, 100
    _, losses, evals, first = R.run(name, words, steps, every, **REPLICA)
    out = tmp_path / name
    flags = ["--n-embd", "12", "--n-embd2", "20", "--n-head", "3", "--n-layers", "2"]
    assert main(["train", "--model", name, *flags, "--steps", str(steps), "--eval-every", str(every),
                 "--chunk-steps", "100", "--out", str(out), "--quiet", "--samples", "0"]) == 0
    mcfg = models.preset(name, **SMALL, vocab_size=27)
    splits = data.make_sequences(words, 16, 3407)
    state = train.new_state(mcfg, TrainConfig.for_model(name), len(words))
    idx = torch.randint(0, splits.Xtr.shape[0], (5, 32), generator=state.generator)
    for k, (X, Y) in enumerate(first):
        assert torch.equal(splits.Xtr[idx[k]], X) and torch.equal(splits.Ytr[idx[k]], Y)

    ours = checkpoint.load(out).state.losses
    assert (ours - torch.tensor(losses, dtype=torch.float64)).abs().max() < 1e-5
    got = json.loads((out / "evals.json").read_text())
    assert [e["step"] for e in got] == [i + 1 for i, _, _ in evals]
    assert max(abs(e["test"] - test) for e, (_, _, test) in zip(got, evals)) < 1e-5


def test_makemore_rng_is_refused_for_the_lectures_models_and_with_lecture_rng(capsys):
    assert main(["train", "--model", "mlp", "--makemore-rng", "--steps", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--makemore-rng" in err[0] and "mlp" in err[0]
    assert main(["train", "--model", "bow", "--lecture-rng", "--steps", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-makemore-rng" in err[0]
    with pytest.raises(ConfigError):
        TrainConfig(lecture_rng=True, makemore_rng=True)


def test_no_makemore_rng_turns_the_zoos_default_off(tmp_path):
    out = tmp_path / "bow"
    assert main(["train", "--model", "bow", "--no-makemore-rng", "--steps", "3", "--n-embd", "8",
                 "--n-embd2", "8", "--out", str(out), "--quiet", "--samples", "0"]) == 0

    assert checkpoint.load(out).train_config.makemore_rng is False
