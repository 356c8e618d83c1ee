"""Data-parallel training (handgrad.engines.parallel): synchronized batchnorm against the single-process
BatchNorm1d on the concatenated batch, autograd and finite differences; N ranks against one process
step for step; the --nproc launcher, its refusals, a killed and a hung rank. Ranks are real processes
talking gloo over 127.0.0.1 only."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from handgrad import checkpoint, config, data, engines, models, ops, train
from handgrad.check import FD_EPS, FD_TOL, autograd_tolerance
from handgrad.cli import main
from handgrad.engines import native, parallel
from handgrad.engines.parallel import DistUsageError, RankEnv, SyncBatchNorm1d
from handgrad.layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh
from handgrad.train import NonFiniteError, TrainConfig

PY = sys.executable
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _holds(manual, reference):
    """Within the checker's tolerance against autograd for the reference's dtype and magnitude."""
    return autograd_tolerance(reference.dtype, reference).holds(manual, reference)


# ---------------------------------------------------------------------------- one process
@pytest.mark.parametrize("sizes, C, offset", [([3, 5], 4, 0.0), ([1, 7, 2], 3, 1e3), ([16, 16], 5, -2.0)])
def test_merged_moments_equal_the_two_pass_statistics_of_the_whole_batch(sizes, C, offset):
    g = torch.Generator().manual_seed(sum(sizes))
    x = torch.randn((sum(sizes), C), generator=g, dtype=torch.float64) * 2 + offset  # (n, C)
    rows = []
    for part in x.split(sizes):
        mean = part.mean(0)
        rows.append(torch.cat([torch.tensor([float(part.shape[0])], dtype=torch.float64), mean,
                               ((part - mean) ** 2).sum(0)]))
    mean, m2, n = parallel.merge_moments(torch.stack(rows))
    var = m2 / (n - 1)
    _, _, (bnmeani, bnvar) = ops.batchnorm_forward(x, torch.ones(C, dtype=x.dtype), torch.zeros(C, dtype=x.dtype))
    assert n == sum(sizes)
    assert _holds(mean, bnmeani.reshape(-1))
    assert _holds(var, bnvar.reshape(-1))


def test_a_batch_the_ranks_do_not_divide_is_refused_in_one_line():
    assert parallel.shard(32, 4, 3) == slice(24, 32)
    with pytest.raises(DistUsageError, match=r"^batch_size 30 is not divisible by 4 ranks; use a multiple of 4") as e:
        parallel.shard(30, 4, 0)
    assert e.value.render(lambda field: "--" + field.replace("_", "-")).startswith("--batch-size 30 is not")


def test_rank_env_reads_torchrun_variables_and_refuses_bad_ones():
    assert RankEnv.from_env({}) is None
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert RankEnv.from_env(env) == RankEnv(3, 4, 1, "10.0.0.1:29500")
    with pytest.raises(DistUsageError, match="RANK=4 is outside"):
        RankEnv.from_env({**env, "RANK": "4"})
    with pytest.raises(DistUsageError, match="expected integers"):
        RankEnv.from_env({**env, "WORLD_SIZE": "two"})
    with pytest.raises(DistUsageError, match="HANDGRAD_DIST_TIMEOUT='0'"):
        parallel.timeout_seconds({parallel.TIMEOUT_ENV: "0"})


def _sleepers(*seconds):
    return [subprocess.Popen([PY, "-c", f"import time, sys; time.sleep({s}); sys.exit({c})"])
            for s, c in seconds]


def test_supervisor_names_a_killed_rank_and_stops_within_the_grace_period():
    procs = _sleepers((0.2, 0), (30, 0))  # rank 1 is killed; rank 0 had finished
    time.sleep(0.5)
    procs[1].kill()
    outcome = parallel.supervise(procs, grace=1.0)
    assert outcome.code == 1 and outcome.message == "rank 1 was killed by SIGKILL; rank(s) 0 had already finished"


def test_supervisor_stops_and_names_a_hung_rank():
    procs = _sleepers((0.2, 1), (60, 0))  # rank 0 gave up (timeout); rank 1 never answers
    t0 = time.monotonic()
    outcome = parallel.supervise(procs, grace=1.0)
    assert time.monotonic() - t0 < 10 and procs[1].returncode is not None
    assert outcome.code == 1 and outcome.message.startswith("rank 1 stopped responding (rank 0 gave up")


def test_supervisor_stays_quiet_when_every_rank_failed_alike():
    assert parallel.supervise(_sleepers((0.1, 2), (0.3, 2)), grace=5.0) == parallel.Outcome(2, "")
    assert parallel.supervise(_sleepers((0.1, 0), (0.2, 0)), grace=5.0) == parallel.Outcome(0, "")


def _one_line_error(capsys, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("handgrad: error:") and "\n" not in err, err
    assert expected in err, err


@pytest.mark.parametrize("flags, expected", [
    (["--nproc", "3"], "--batch-size 32 is not divisible by 3 ranks; use a multiple of 3"),
    (["--nproc", "2", "--engine", "fast", "--dtype", "float64"],
     "--engine fast: the fast engine is unavailable (the fast path is float32 only"),
    (["--nproc", "2", "--diagnostics"], "--diagnostics measures one process"),
    (["--nproc", "0"], "--nproc 0: expected a positive number"),
])
def test_flags_that_cannot_run_on_several_ranks_exit_2_before_starting_any(tmp_path, capsys, flags, expected):
    _one_line_error(capsys, ["train", "--steps", "10", "--quiet", "--out", str(tmp_path / "o"), *flags], expected)
    assert not (tmp_path / "o").exists()


def test_nproc_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    for k, v in parallel.rank_env(0, 2, 1).items():
        monkeypatch.setenv(k, v)
    _one_line_error(capsys, ["train", "--nproc", "2", "--steps", "10", "--quiet", "--out", str(tmp_path / "o")],
                    "--nproc starts its own processes; under torchrun")


# ---------------------------------------------------------------------------- synchronized batchnorm
# (shape of the whole batch, rows per rank, seed): 2-D and 3-D (wavenet's (N, T, C)), equal and unequal
SYNC_BN_CASES = [((8, 4), (3, 5), 0), ((6, 5), (3, 3), 1), ((4, 2, 3), (1, 3), 2), ((10, 3), (5, 5), 3)]
FD_ELEMENTS = 6  # elements of x checked by finite differences per case (all of gain and bias)


def _bn_problem(shape, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + 0.3  # non-trivial mean and scale
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    gain = torch.randn(C, generator=g, dtype=torch.float64) * 0.4 + 1.0
    bias = torch.randn(C, generator=g, dtype=torch.float64) * 0.2
    return x, dout, gain, bias


def _syncbn_worker(comm, cases):
    out = []
    for shape, rows, seed in cases:
        x, dout, gain, bias = _bn_problem(shape, seed)
        lo = sum(rows[:comm.rank])
        mine = slice(lo, lo + rows[comm.rank])
        bn = SyncBatchNorm1d(shape[-1], dtype=torch.float64, comm=comm)
        bn.weight.copy_(gain)
        bn.bias.copy_(bias)
        y, cache = bn.forward(x[mine])
        dx, grads = bn.backward(dout[mine], cache)

        def loss(xs=None, bn=bn, x=x, dout=dout, mine=mine):  # global sum(y * dout) over every rank
            y, _ = bn.forward(x[mine] if xs is None else xs)
            return comm.all_reduce_((y * dout[mine]).sum().reshape(1), "fd")[0]

        fd = {"x": [], "weight": [], "bias": []}
        g = torch.Generator().manual_seed(100 + seed)
        picks = torch.randint(0, x.numel(), (FD_ELEMENTS,), generator=g).tolist()
        for flat in picks:  # every rank evaluates; only the owner of the row perturbs it
            row = flat // (x.numel() // x.shape[0])
            vals = []
            for sign in (1, -1):
                xs = x.clone()
                if mine.start <= row < mine.stop:
                    xs.view(-1)[flat] += sign * FD_EPS
                vals.append(loss(xs[mine]))
            fd["x"].append([flat, float((vals[0] - vals[1]) / (2 * FD_EPS))])
        for name in ("weight", "bias"):
            t = getattr(bn, name)
            for c in range(t.numel()):
                vals = []
                for sign in (1, -1):
                    t[c] += sign * FD_EPS
                    vals.append(loss())
                    t[c] -= sign * FD_EPS
                fd[name].append(float((vals[0] - vals[1]) / (2 * FD_EPS)))
        out.append({"y": y, "dx": dx, "dweight": grads["weight"], "dbias": grads["bias"],
                    "mean": cache[1][0], "var": cache[1][1], "fd": fd})
    return out


@pytest.fixture(scope="module")
def syncbn_ranks():
    return parallel.spawn(_syncbn_worker, 2, SYNC_BN_CASES)


@pytest.mark.parametrize("case", range(len(SYNC_BN_CASES)))
def test_sync_batchnorm_over_2_ranks_equals_batchnorm1d_on_the_concatenated_batch(syncbn_ranks, case):
    shape, rows, seed = SYNC_BN_CASES[case]
    x, dout, gain, bias = _bn_problem(shape, seed)
    bn = BatchNorm1d(shape[-1], dtype=torch.float64)
    bn.weight.copy_(gain)
    bn.bias.copy_(bias)
    y, cache = bn.forward(x)
    dx, grads = bn.backward(dout, cache)
    r0, r1 = syncbn_ranks[0][case], syncbn_ranks[1][case]
    assert r0["y"].shape[0] == rows[0] and r1["y"].shape[0] == rows[1]
    assert _holds(torch.cat([r0["y"], r1["y"]]), y)
    assert _holds(torch.cat([r0["dx"], r1["dx"]]), dx)
    # each rank's dgain/dbias is its share; the data-parallel all-reduce sums the shares
    assert _holds(r0["dweight"] + r1["dweight"], grads["weight"])
    assert _holds(r0["dbias"] + r1["dbias"], grads["bias"])
    # the statistics (for the running averages) are the global ones, bit-identical on both ranks
    assert torch.equal(r0["mean"], r1["mean"]) and torch.equal(r0["var"], r1["var"])
    assert _holds(r0["var"], cache[1][1])


@pytest.mark.parametrize("case", range(len(SYNC_BN_CASES)))
def test_sync_batchnorm_backward_matches_autograd_and_finite_differences(syncbn_ranks, case):
    shape, _, seed = SYNC_BN_CASES[case]
    x, dout, gain, bias = _bn_problem(shape, seed)
    leaves = [t.clone().requires_grad_(True) for t in (x, gain, bias)]
    y, _, _ = ops.batchnorm_forward(*leaves)
    ax, again, abias = torch.autograd.grad((y * dout).sum(), leaves)
    r0, r1 = syncbn_ranks[0][case], syncbn_ranks[1][case]
    dx = torch.cat([r0["dx"], r1["dx"]])
    dgain, dbias = r0["dweight"] + r1["dweight"], r0["dbias"] + r1["dbias"]
    assert _holds(dx, ax) and _holds(dgain, again) and _holds(dbias, abias)
    fd = r0["fd"]
    assert fd == r1["fd"]  # every rank saw the same global loss
    for flat, numeric in fd["x"]:
        assert FD_TOL.holds(dx.reshape(-1)[flat], torch.tensor(numeric, dtype=torch.float64)), (flat, numeric)
    assert FD_TOL.holds(dgain, torch.tensor(fd["weight"], dtype=torch.float64))
    assert FD_TOL.holds(dbias, torch.tensor(fd["bias"], dtype=torch.float64))


def test_a_wrong_global_count_would_be_caught():
    """The checks above can fail: the per-rank n (what N independent batchnorms would use) gives
    another dx than the single-process batchnorm on the concatenated batch."""
    x, dout, gain, bias = _bn_problem((8, 4), 0)
    _, cache, _ = ops.batchnorm_forward(x, gain, bias)
    dx_all, _, _ = ops.batchnorm_backward(dout, cache)
    _, c0, _ = ops.batchnorm_forward(x[:3], gain, bias)
    dx_local, _, _ = ops.batchnorm_backward(dout[:3], c0)
    assert not _holds(dx_local, dx_all[:3])


# ---------------------------------------------------------------------------- the native program's hook
class _OneRank(parallel.WorldOfOne):
    """parallel.WorldOfOne whose n-th collective (counting from 0) raises `fail` instead."""

    def __init__(self, fail: BaseException | None = None, at: int = 0):
        super().__init__()
        self.fail, self.at, self.seen = fail, at, 0

    def start(self, what, fn):
        if self.fail is not None and self.seen == self.at:
            raise self.fail
        self.seen += 1
        return super().start(what, fn)


def _native_problem(name):
    block = 8 if name == "wavenet" else 3
    splits = data.make_splits(data.read_words(data.default_data_path()).items, block_size=block, seed=42)
    mcfg = models.preset(name, vocab_size=len(splits.vocab), block_size=block)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, splits.Xtr.shape[0], (6, 32), generator=g)  # (K, B)
    return splits, models.build(mcfg, 3, torch.float32), idx, torch.full((6,), 0.1, dtype=torch.float64)


def _custom(V, T, E, bn_first, seed=5):
    """Embedding -> Flatten -> Linear(+b) -> [BatchNorm1d] -> Tanh -> Linear -> BatchNorm1d -> Linear, on
    random characters: the first batchnorm is counted (op 2) only when bn_first."""
    g = torch.Generator().manual_seed(seed)
    first = [BatchNorm1d(16)] if bn_first else []
    model = Sequential([Embedding(V, E), FlattenConsecutive(T), Linear(T * E, 16), *first, Tanh(),
                        Linear(16, 32, bias=False), BatchNorm1d(32), Linear(32, V)])
    for t in model.params().values():  # non-trivial: every parameter random, the gains away from 1
        t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t.dim() == 1 else 0.0))
    X = torch.randint(0, V, (500, T), generator=g)
    Y = torch.randint(0, V, (500,), generator=g)
    return model, X, Y


# (model, tile, batchnorms, counted): the first batchnorm's statistics need no collective (counted from
# the global batch's characters) when it follows the first Linear, tiled or not
HOOK_CASES = [("mlp", 0, 1, True), ("deep", 0, 6, True), ("wavenet", 0, 3, True), ("deep", 8, 6, True),
              ("mlp", 8, 1, True),
              ("custom-bn-first", 0, 2, True), ("custom-bn-later", 0, 1, False),
              ("custom-large-vocab", 0, 2, False)]


@pytest.mark.parametrize("name, tile, bns, counted", HOOK_CASES)
def test_the_native_hook_on_one_rank_is_the_plain_program(name, tile, bns, counted):
    """Every collective the program asks for arrives (3 kinds, in the expected numbers) and, over one
    rank, changes nothing but rounding: the losses and parameters of the plain program, also where the
    first batchnorm's statistics come from counts instead of the rows (a bias before it, 1 to 4 rows
    per example; 3 x 800^2 pair counts are too many and fall back to the collective)."""
    lib = native.load_program_library()
    if name.startswith("custom"):
        V = 800 if name == "custom-large-vocab" else 27
        model, X, Y = _custom(V, 3, 4, name != "custom-bn-later")
        plain, _, _ = _custom(V, 3, 4, name != "custom-bn-later")
        g = torch.Generator().manual_seed(7)
        idx, lrs = torch.randint(0, 500, (6, 32), generator=g), torch.full((6,), 0.1, dtype=torch.float64)
    else:
        splits, model, idx, lrs = _native_problem(name)
        X, Y = splits.Xtr, splits.Ytr
        plain = models.build(models.preset(name, vocab_size=len(splits.vocab), block_size=X.shape[1]), 3,
                             torch.float32)
    one = _OneRank()
    with torch.no_grad():
        got = parallel.native_data_parallel_steps(one, lib, tile)(model, X, Y, idx, lrs)
        want = native.make_program_fn(lib, tile)(plain, X, Y, idx, lrs)
    assert (got - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max()))
    assert all(torch.allclose(model.params()[k], v, rtol=1e-5, atol=1e-6) for k, v in plain.params().items())
    K = idx.shape[0]
    # counted: the first batchnorm's statistics and backward sums need no collective of their own
    want_calls = {"batchnorm forward": K * (bns - counted), "batchnorm backward": K * (bns - counted),
                  "gradients": K}
    assert dict(one.calls) == {k: v for k, v in want_calls.items() if v}


def _deferred_case(name, seed):
    """(model, X, Y) whose first batchnorm the native hook counts and defers: presets at small sizes
    (1 to 4 rows per example), and a Linear with a bias in front of it, every parameter random."""
    g = torch.Generator().manual_seed(seed)
    if name == "bias":
        model = Sequential([Embedding(13, 5), FlattenConsecutive(3), Linear(15, 20), BatchNorm1d(20), Tanh(),
                            Linear(20, 17), BatchNorm1d(17), Linear(17, 13)])
        for t in model.params().values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t.dim() == 1 else 0.0))
        V, T = 13, 3
    else:
        over = {"mlp": dict(n_hidden=40, block_size=3, n_embd=4, vocab_size=11),
                "deep": dict(n_hidden=20, n_layers=3, block_size=4, n_embd=5, vocab_size=11),
                "wavenet": dict(n_hidden=17, block_size=8, n_embd=6, vocab_size=11)}[name]
        cfg = models.preset(name, **over)
        model, V, T = models.build(cfg, seed), cfg.vocab_size, cfg.block_size
        for t in model.params().values():  # non-trivial: gains and biases away from 1 and 0
            if t.dim() == 1:
                t.add_(torch.randn(t.shape, generator=g) * 0.3)
    return model, torch.randint(0, V, (48, T), generator=g), torch.randint(0, V, (48,), generator=g)


@pytest.mark.parametrize("via", ["hook", "one process"])
@pytest.mark.parametrize("tile", [0, 16])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["mlp", "deep", "wavenet", "bias"])
def test_the_deferred_first_batchnorm_backward_matches_float64_autograd(name, seed, tile, via):
    """program.cpp's deferred backward of the first batchnorm (the rows' part before the gradient
    all-reduce, the terms that need the global sums from the counts after it): every gradient of one
    step, through the hook (a world of one) and in one process asked to count (no hook: what
    handgrad train runs for the mlp at large batches), against float64 autograd on the same batch. A
    bias in front of a batchnorm (the mlp's b1) has a zero gradient in exact arithmetic. tile 16:
    activation checkpointing, 3 tiles of the 48 examples (the deferred part summed tile by tile)."""
    from handgrad import reference
    model, X, Y = _deferred_case(name, seed)
    ref = reference.autograd_grads(models.cast(copy.deepcopy(model), torch.float64), X, Y)
    params = model.params()
    out = torch.zeros(sum(t.numel() for t in params.values()))
    one = _OneRank()
    hook = parallel.NativeCollectives(one)
    with torch.no_grad():
        losses, status, prog = native._run_program(native.load_program_library(), model, X, Y,
                                                 torch.arange(X.shape[0])[None], torch.zeros(1, dtype=torch.float64),
                                                 tile, out, sync=hook.fn if via == "hook" else None,
                                                 count=via != "hook")
    later = sum(isinstance(layer, BatchNorm1d) for layer in model.layers) - 1  # the first one: no collective
    calls = {"gradients": 1, **({"batchnorm forward": later, "batchnorm backward": later} if later else {})}
    assert status == -1 and dict(one.calls) == (calls if via == "hook" else {})
    assert abs(float(losses[0]) - float(ref.loss)) <= 1e-5 * float(ref.loss)
    grads = dict(zip(prog.params, out.split([params[n].numel() for n in prog.params])))
    scale = max(float(r.abs().max()) for r in ref.grads.values())
    for k, r in ref.grads.items():
        got = grads[k].view(r.shape).double()
        if k in {"mlp": ("2.bias",), "bias": ("2.bias", "5.bias")}.get(name, ()):  # in front of a batchnorm
            assert float(r.abs().max()) <= 1e-12 * scale and float(got.abs().max()) <= 1e-6 * scale, k
            continue
        err = float((got - r).abs().max()) / float(r.abs().max())
        assert err <= 2e-5, f"d{k}: relative error {err:.2e}"


@pytest.mark.parametrize("bad", [-1, 27, 300])
@pytest.mark.parametrize("tile", [0, 8])
def test_a_character_outside_the_vocabulary_in_another_ranks_rows_stops_every_rank_at_that_step(tile, bad):
    """Every rank counts the whole global batch (the first batchnorm, counted), so a bad character in
    rank 1's rows of step 2 stops rank 0 at step 2 too, before any collective of that step (else rank 0
    would wait in the all-reduce for a rank that stopped): IndexError naming the step, the state
    before it kept, untiled and tiled. Rank 0 of 2 of the mlp runs here alone (WorldOfOne sums over
    one rank, so the losses are not the 2-rank ones; the mlp's one batchnorm makes no other
    collective)."""
    lib = native.load_program_library()
    splits, model, idx, lrs = _native_problem("mlp")
    _, before, _, _ = _native_problem("mlp")
    X = splits.Xtr.clone()
    X[idx[2, 20], 1] = bad  # idx (6, 32): columns 16.. are rank 1's
    one = parallel.WorldOfOne()
    run = native.make_program_fn(lib, tile, sync=parallel.NativeCollectives(one).fn)
    with torch.no_grad():
        run(before, X, splits.Ytr, idx[:2], lrs[:2], ranks=2, rank=0)
        with pytest.raises(IndexError, match="at step 2"):
            run(model, X, splits.Ytr, idx, lrs, ranks=2, rank=0)
    assert one.calls["gradients"] == 4  # 2 steps each time; none at step 2
    assert all(torch.equal(model.params()[k], v) for k, v in before.params().items())


@pytest.mark.parametrize("row", ["-1", "n", "2^40"])
@pytest.mark.parametrize("tile", [0, 8])
def test_a_row_outside_x_in_another_ranks_columns_stops_every_rank_at_that_step(tile, row):
    """Every rank reads every row of the global batch to count it, so an index outside Xtr in rank 1's
    columns of step 2 stops rank 0 at step 2 too (IndexError naming the step, the state before it
    kept), rather than reading outside X; idx (6, 32): columns 16.. are rank 1's."""
    lib = native.load_program_library()
    splits, model, idx, lrs = _native_problem("mlp")
    _, before, _, _ = _native_problem("mlp")
    idx = idx.clone()
    idx[2, 20] = {"-1": -1, "n": splits.Xtr.shape[0], "2^40": 2 ** 40}[row]
    one = parallel.WorldOfOne()
    run = native.make_program_fn(lib, tile, sync=parallel.NativeCollectives(one).fn)
    with torch.no_grad():
        run(before, splits.Xtr, splits.Ytr, idx[:2], lrs[:2], ranks=2, rank=0)
        with pytest.raises(IndexError, match="at step 2"):
            run(model, splits.Xtr, splits.Ytr, idx, lrs, ranks=2, rank=0)
    assert one.calls["gradients"] == 4  # 2 steps each time; none at step 2
    assert all(torch.equal(model.params()[k], v) for k, v in before.params().items())


@pytest.mark.parametrize("error, at", [(parallel.PeerLost("rank 0: the gradients collective failed"), 1),
                                       (KeyboardInterrupt(), 0), (KeyboardInterrupt(), 3)])
def test_a_failed_collective_in_the_native_step_is_raised_and_keeps_the_state_before_that_step(error, at):
    lib = native.load_program_library()
    splits, model, idx, lrs = _native_problem("mlp")
    _, before, _, _ = _native_problem("mlp")
    done = at  # per step one collective: the gradients (the first batchnorm's are counted and deferred)
    with torch.no_grad():
        native.make_program_fn(lib)(before, splits.Xtr, splits.Ytr, idx[:done], lrs[:done])
        with pytest.raises(type(error)) as e:
            parallel.native_data_parallel_steps(_OneRank(error, at), lib)(model, splits.Xtr, splits.Ytr, idx,
                                                                             lrs)
    assert e.value is error
    assert all(torch.allclose(model.params()[k], v, atol=1e-6) for k, v in before.params().items())


# ---------------------------------------------------------------------------- N ranks vs one process
def _splits():
    words = data.read_words(data.default_data_path())
    return data.make_splits(words.items, block_size=3, seed=42)


def _train(name, dtype, steps, comm=None, batch=32, lr=0.1, block_size=None, engine="eager", tile=0):
    """A run of `steps`; engine "fast": in one process the single-process fast engine (the fused
    lecture step for mlp, the native program for the others), on ranks the native data-parallel
    program (a different code path from the one it is compared with)."""
    splits = _splits() if block_size is None else data.make_splits(
        data.read_words(data.default_data_path()).items, block_size=block_size, seed=42)
    mcfg = models.preset(name, vocab_size=len(splits.vocab), **({"block_size": block_size} if block_size else {}))
    tcfg = TrainConfig.for_model(name, steps=steps, batch_size=batch, lr=lr, dtype=dtype, engine=engine,
                                 chunk_steps=250, recompute_tile=tile)
    if comm is None:
        steps_fn = None  # engines.plan's
    elif engine == "fast":
        steps_fn = parallel.native_data_parallel_steps(comm, native.load_program_library(), tile)
    else:
        steps_fn = parallel.data_parallel_steps(comm)
    try:
        if steps_fn is None:
            state = engines.fit(splits, mcfg, tcfg)
        else:
            state = train.train(splits, mcfg, tcfg, None, None, steps_fn)
    except NonFiniteError as e:
        return {"error": [e.step, e.tensor]}
    return {"losses": state.losses, "params": state.model.params(), "buffers": state.model.buffers()}


# (model, dtype, steps, per-step loss tolerance) for every model in both dtypes (deep: 6 batchnorms,
# wavenet: 3 over (N, T, C)). CI runs 20 steps; the 1000-step comparison is a run done once,
# with the numbers printed (docs/scale.md records them):
#   HANDGRAD_DIST_STEPS=1000 PYTHONPATH=src python -m pytest tests/test_distributed.py -k take_the -s
STEPS = int(os.environ.get("HANDGRAD_DIST_STEPS", "20"))


@dataclass(frozen=True)
class Run:
    name: str
    dtype: str
    engine: str = "eager"
    tile: int = 0  # activation checkpointing (fast engine): examples per tile on each rank
    steps: int = STEPS

    @property
    def tol(self) -> float:  # the per-step loss tolerance
        return {"float32": 1e-5, "float64": 1e-12}[self.dtype]

    def __str__(self) -> str:
        return f"{self.name}-{self.dtype}-{self.engine}{f'-tile{self.tile}' if self.tile else ''}-{self.steps}"

    def train(self, comm=None):
        return _train(self.name, self.dtype, self.steps, comm, block_size=8 if self.name == "wavenet" else None,
                      engine=self.engine, tile=self.tile)


# eager: every model in both dtypes; fast (float32 only): every model, and tiles of 8 of a rank's 16
RUNS = ([Run(name, dtype) for name in ("mlp", "deep", "wavenet") for dtype in ("float32", "float64")]
        + [Run(name, "float32", "fast") for name in ("mlp", "deep", "wavenet")]
        + [Run("deep", "float32", "fast", tile=8), Run("wavenet", "float32", "fast", tile=8)])


def _dp_worker(comm, runs):
    out = [run.train(comm) for run in runs]
    out.append(_train("mlp", "float32", 20, comm, lr=1e30))  # diverges: every rank must stop alike
    comm_seconds = dict(comm.seconds), dict(comm.calls)
    return {"runs": out, "comm": comm_seconds}


@pytest.fixture(scope="module")
def single_process():
    runs = [run.train() for run in RUNS]
    return runs + [_train("mlp", "float32", 20, lr=1e30)]


@pytest.fixture(scope="module")
def two_ranks():
    return parallel.spawn(_dp_worker, 2, RUNS, timeout=120)


def _max_step_diff(got, one, run, ranks) -> float:
    """The largest per-step loss difference, printed for the record (seen with pytest -s)."""
    diff = (got["losses"] - one["losses"]).abs().max().item()
    print(f"\n{run}: {ranks} ranks vs 1 process: max |loss diff| {diff:.3g} (<= {run.tol:g})")
    return diff


@pytest.mark.parametrize("run", range(len(RUNS)), ids=[str(r) for r in RUNS])
def test_2_ranks_take_the_single_process_step_with_the_same_global_batch(single_process, two_ranks, run):
    tol = RUNS[run].tol
    one = single_process[run]
    for rank in two_ranks:
        got = rank["runs"][run]
        diff = _max_step_diff(got, one, RUNS[run], 2)
        assert diff <= tol, f"max per-step loss difference {diff:.3g} > {tol:g}"
        assert torch.isfinite(got["losses"]).all()
    # the replicas never drift apart: one summed buffer, the same update on every rank
    a, b = (r["runs"][run] for r in two_ranks)
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert all(torch.equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"])


def test_2_ranks_stop_at_the_same_non_finite_step_as_one_process(single_process, two_ranks):
    expected = single_process[-1]["error"]
    assert [r["runs"][-1]["error"] for r in two_ranks] == [expected, expected]


def test_one_gradient_all_reduce_per_step_and_two_collectives_per_later_batchnorm(two_ranks):
    """Per step: one gradient all-reduce, and per batchnorm one all-reduce of its backward sums and one
    all-gather of its statistics, except the native step's first batchnorm (counted and deferred to the
    gradient all-reduce: no collective of its own)."""
    seconds, calls = two_ranks[0]["comm"]
    steps = sum(r.steps for r in RUNS)  # + the diverging (eager) run's steps up to its failure
    bns = {"mlp": 1, "deep": 6, "wavenet": 3}
    forward = sum(r.steps * (bns[r.name] - (r.engine == "fast")) for r in RUNS)
    backward = forward
    diverged_at = two_ranks[0]["runs"][-1]["error"][0] + 1
    assert calls["gradients"] - steps in (diverged_at - 1, diverged_at)
    assert calls["batchnorm forward"] - forward in (diverged_at - 1, diverged_at)
    assert calls["batchnorm backward"] - backward in (diverged_at - 1, diverged_at)


def _dp4_worker(comm, runs):
    return [run.train(comm) for run in runs]


@pytest.fixture(scope="module")
def four_ranks():
    return parallel.spawn(_dp4_worker, 4, RUNS, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(len(RUNS)), ids=[str(r) for r in RUNS])
def test_4_ranks_take_the_single_process_step(single_process, four_ranks, run):
    tol = RUNS[run].tol
    one = single_process[run]
    for got in (r[run] for r in four_ranks):
        diff = _max_step_diff(got, one, RUNS[run], 4)
        assert diff <= tol, f"max per-step loss difference {diff:.3g} > {tol:g}"
    for got in four_ranks[1:]:
        assert all(torch.equal(got[run]["params"][k], four_ranks[0][run]["params"][k]) for k in got[run]["params"])


# ---------------------------------------------------------------------------- the command
def _handgrad(*argv, env=None, **kw):
    return subprocess.Popen([PY, "-m", "handgrad", *argv], env={**os.environ, "PYTHONPATH": SRC, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


RUN_FLAGS = ["--n-hidden", "64", "--dtype", "float64", "--chunk-steps", "100", "--checkpoint-every", "100",
             "--quiet", "--samples", "0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "whole"
    p = _handgrad("train", "--nproc", "2", "--steps", "800", "--out", str(out), *RUN_FLAGS)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    return out


def test_nproc_2_trains_the_single_process_model(uninterrupted, tmp_path, capsys):
    ck = checkpoint.load(uninterrupted)
    assert ck.results["engine"] == "2-rank data-parallel eager (gloo)" and ck.state.step == 800
    assert main(["train", "--steps", "800", "--engine", "eager", "--out", str(tmp_path / "one"), *RUN_FLAGS]) == 0
    one = checkpoint.load(tmp_path / "one")
    assert (ck.state.losses - one.state.losses).abs().max().item() <= 1e-12
    assert abs(ck.results["val"] - one.results["val"]) <= 1e-12


def _rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes --nproc started (children of the launcher)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(e[5:]) for e in environ if e.startswith(b"RANK="))
        ranks[rank] = pid
    return ranks


def _wait_for_checkpoint(out: Path, step: int, p, limit: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit and p.poll() is None:
        try:
            if json.loads((out / "meta.json").read_text())["step"] >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {limit}s")


@pytest.mark.slow
@pytest.mark.parametrize("victim, resume_nproc", [(1, "1"), (0, "2")])  # (0: the rank that writes checkpoints)
def test_kill_9_of_a_rank_leaves_a_checkpoint_that_resumes_to_the_same_result(uninterrupted, tmp_path, victim,
                                                                             resume_nproc):
    out = tmp_path / "killed"
    p = _handgrad("train", "--nproc", "2", "--steps", "800", "--out", str(out), *RUN_FLAGS)
    _wait_for_checkpoint(out, 200, p)
    os.kill(_rank_pids(p.pid)[victim], signal.SIGKILL)
    t0 = time.monotonic()
    _, stderr = p.communicate(timeout=120)
    assert time.monotonic() - t0 < 30
    assert p.returncode == 1 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == f"handgrad: error: rank {victim} was killed by SIGKILL; the other rank stopped", stderr
    survivor = 1 - victim
    assert f"rank {survivor}: the " in stderr and "collective failed" in stderr, stderr
    if victim == 1:  # rank 0 lives to name the checkpoint to resume from
        assert "--resume" in stderr
    saved = checkpoint.load(out)  # intact: sha256 and shapes verified
    assert 200 <= saved.state.step < 800 and not saved.results
    whole = checkpoint.load(uninterrupted)
    # resume on 2 ranks: bit-identical; on 1 process (another rank count): the same to 1e-12
    again = tmp_path / "again"
    r = _handgrad("train", "--resume", str(out), "--out", str(again), "--nproc", resume_nproc, "--engine", "eager",
                  "--quiet", "--samples", "0")
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    got = checkpoint.load(again)
    diff = (got.state.losses - whole.state.losses).abs().max().item()
    assert (diff == 0) if resume_nproc == "2" else diff <= 1e-12, diff
    assert abs(got.results["val"] - whole.results["val"]) <= 1e-12


NATIVE_FLAGS = ["--n-hidden", "64", "--chunk-steps", "100", "--checkpoint-every", "100", "--quiet", "--samples",
                "0", "--batch-size", "64"]  # float32: the ranks run the native program


@pytest.mark.slow
def test_nproc_2_on_the_native_engine_trains_the_single_process_model_and_survives_kill_9(tmp_path):
    """`handgrad train --nproc 2` in float32 runs the native program on each rank (counted first
    batchnorm, overlapped sums, the hook): the losses of one process on the fast engine to 1e-5; a
    kill -9 of rank 1 leaves a checkpoint that resumes, on 2 ranks, to the same bits."""
    whole, one, killed, again = (tmp_path / d for d in ("whole", "one", "killed", "again"))
    p = _handgrad("train", "--nproc", "2", "--steps", "600", "--out", str(whole), *NATIVE_FLAGS)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    dp = checkpoint.load(whole)
    assert dp.results["engine"] == "2-rank data-parallel fast (gloo)" and dp.state.step == 600
    r = _handgrad("train", "--steps", "600", "--out", str(one), *NATIVE_FLAGS)
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    single = checkpoint.load(one)
    assert single.results["engine"] == "fast"
    assert (dp.state.losses - single.state.losses).abs().max().item() <= 1e-5
    assert abs(dp.results["val"] - single.results["val"]) <= 1e-5

    p = _handgrad("train", "--nproc", "2", "--steps", "600", "--out", str(killed), *NATIVE_FLAGS)
    _wait_for_checkpoint(killed, 200, p)
    os.kill(_rank_pids(p.pid)[1], signal.SIGKILL)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == ("handgrad: error: rank 1 was killed by SIGKILL; the other rank "
                                               "stopped"), stderr
    assert "rank 0: the " in stderr and "collective failed" in stderr and "--resume" in stderr, stderr
    assert 200 <= checkpoint.load(killed).state.step < 600
    r = _handgrad("train", "--resume", str(killed), "--out", str(again), "--nproc", "2", "--quiet", "--samples", "0")
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    got = checkpoint.load(again)
    assert torch.equal(got.state.losses, dp.state.losses)
    assert got.results["val"] == dp.results["val"]


@pytest.mark.slow
def test_a_hung_rank_stops_the_others_within_the_timeout(tmp_path):
    out = tmp_path / "hung"
    p = _handgrad("train", "--nproc", "2", "--steps", "100000", "--out", str(out), *RUN_FLAGS,
                  env={parallel.TIMEOUT_ENV: "3"})
    _wait_for_checkpoint(out, 100, p)
    hung = _rank_pids(p.pid)[1]
    os.kill(hung, signal.SIGSTOP)
    t0 = time.monotonic()
    _, stderr = p.communicate(timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == 1 and "Traceback" not in stderr, stderr
    assert took < 3 + 3 + 2 + 5, took  # timeout, grace, SIGINT->SIGKILL, slack
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("handgrad: error: rank 1 stopped responding (rank 0 gave up waiting for it)"), last
    assert "Timed out" in stderr
    assert checkpoint.load(out).state.step >= 100


@pytest.mark.parametrize("dtype, engine, tile, want, warns", [
    (torch.float32, "auto", 8, "fast", []),
    (torch.float64, "auto", 0, "eager", ["fast path unavailable"]),
    (torch.float64, "auto", 8, "eager", ["fast path unavailable", "(recompute_tile)"]),
    (torch.float32, "eager", 8, "eager", ["(recompute_tile)"]),
])
def test_a_rank_runs_the_native_program_where_one_process_would_and_says_why_not(dtype, engine, tile, want,
                                                                                   warns):
    model = models.build(models.preset("mlp"), 0, dtype)
    tcfg = TrainConfig(engine=engine, recompute_tile=tile)
    steps_fn, name, warning = engines.plan(model, tcfg, parallel.WorldOfOne())
    warning = config.named(warning)  # the fields the warning names, by their names
    assert name == want and callable(steps_fn) and "\n" not in warning
    assert [w for w in warns if w in warning] == warns and (warning == "") == (not warns)


@pytest.mark.parametrize("tile", [0, 16])
@pytest.mark.parametrize("name", ["mlp", "deep", "wavenet"])
def test_one_process_asked_to_count_runs_the_ranks_counted_step(name, tile):
    """fast's count=True in one process is the data-parallel step's counted and deferred first batchnorm
    (the same bits as through the hook of a world of one), not the plain program's (its statistics from
    the rows: other roundings), for 3 SGD steps."""
    model, X, Y = _deferred_case(name, 0)
    idx = torch.randint(0, X.shape[0], (3, 24), generator=torch.Generator().manual_seed(1))
    lrs = torch.full((3,), 0.1, dtype=torch.float64)
    lib = native.load_program_library()
    runs = {"hook": parallel.native_data_parallel_steps(parallel.WorldOfOne(), lib, tile),
            "count": native.make_program_fn(lib, tile, count=True), "plain": native.make_program_fn(lib, tile)}
    after = {}
    for what, steps in runs.items():
        m = copy.deepcopy(model)
        with torch.no_grad():
            steps(m, X, Y, idx, lrs)
        after[what] = torch.cat([t.flatten() for t in m.params().values()])
    assert torch.equal(after["count"], after["hook"])
    assert not torch.equal(after["count"], after["plain"])
    assert torch.allclose(after["count"], after["plain"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name, world, batch, want", [
    ("mlp", 1, engines.TILE_ROWS, engines.CACHE_TILE), ("mlp", 2, 2 * engines.TILE_ROWS - 2, 0),
    ("mlp", 2, 2 * engines.TILE_ROWS, engines.CACHE_TILE), ("mlp", 1, 32, 0), ("deep", 1, 10 ** 5, 0)])
def test_a_rank_runs_the_mlp_in_cache_tiles_from_tile_rows_per_rank(monkeypatch, model_name, world, batch,
                                                                        want):
    """engines.plan tiles the mlp's native program (engines.CACHE_TILE) as one process does,
    from engines.TILE_ROWS examples per rank (engines.cache_tile); deep never unasked."""
    asked = []
    monkeypatch.setattr(parallel, "native_data_parallel_steps", lambda comm, lib, tile: asked.append(tile))
    one = parallel.WorldOfOne()
    one.world = world  # the rule reads the number of ranks only
    engines.plan(models.build(models.preset(model_name), 0), TrainConfig(batch_size=batch), one)
    assert asked == [want]
