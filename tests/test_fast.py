"""The fast path (fast.py + csrc/step.cpp) against float64 autograd (one-step gradients) and the
eager engine of train.py (per-step losses over hundreds of steps, running statistics, non-finite
detection); activation checkpointing, argument errors, the build cache and the fallback to eager."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from handgrad.model import ModelConfig

from handgrad import fast, model, reference, train
from handgrad.train import NonFiniteError, TrainConfig


def _have_compiler() -> bool:
    try:
        cc = fast._compiler()
    except fast.FastUnavailable:
        return False
    return bool(shutil.which(cc) or os.path.exists(cc))


pytestmark = pytest.mark.skipif(not _have_compiler(), reason="no C++ compiler: the fast path cannot be built")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one torch thread is faster and immune to a busy machine's oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

# (B, T, E, H, V): the reference config, then shapes that are not multiples of the 16-float vector
SHAPES = [(32, 3, 10, 200, 27), (7, 2, 3, 17, 5), (33, 4, 5, 31, 19), (5, 2, 2, 3, 4), (50, 5, 7, 70, 40)]


def _problem(B, T, E, H, V, seed=0, n=500):
    cfg = ModelConfig(vocab_size=V, block_size=T, n_embd=E, n_hidden=H, w1_scale=1.3)
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (n, T), generator=g)  # (n, T)
    Y = torch.randint(0, V, (n,), generator=g)  # (n,)
    return cfg, model.init_params(cfg, seed=seed + 7), X, Y


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """max |a - b| relative to max |b| (or to a given scale)."""
    s = scale if scale is not None else float(b.abs().max())
    return float((a.double() - b.double()).abs().max()) / max(s, 1e-30)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("tile", [0, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_grads_match_float64_autograd(shape, tile):
    cfg, p, X, Y = _problem(*shape)
    B = shape[0]
    Xb, Yb = X[:B], Y[:B]
    before = p.clone()
    loss, grads = fast.fast_grads(p, Xb, Yb, tile=tile)
    assert all(torch.equal(a, b) for a, b in zip(p.tensors(), before.tensors())), "fast_grads modified p"
    ref_loss, ref, _ = reference.autograd_grads(p.to(torch.float64), Xb, Yb)  # float64 autograd
    assert abs(loss - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for (name, r), g in zip(ref.items(), grads.tensors()):
        assert g.shape == r.shape, name
        # db1 is zero in exact arithmetic (batchnorm removes the mean): compare it on dW1's scale
        scale = float(ref.W1.abs().max()) if name == "b1" else None
        assert _rel(g, r, scale) <= 1e-5, f"d{name}: relative error {_rel(g, r, scale):.2e}"


def test_repeated_rows_accumulate_in_dC():
    cfg, p, X, Y = _problem(8, 3, 4, 20, 6)
    X = torch.randint(0, 2, (8, 3), generator=torch.Generator().manual_seed(5))  # rows 0, 1 only
    assert any(len(set(r.tolist())) < 3 for r in X)  # some context repeats a row
    _, grads = fast.fast_grads(p, X, Y[:8])
    _, ref, _ = reference.autograd_grads(p.to(torch.float64), X, Y[:8])
    assert _rel(grads.C, ref.C) <= 1e-5
    assert float(grads.C[2:].abs().max()) == 0.0


# ---------------------------------------------------------------------------- many steps
def _run_both(cfg, p, X, Y, K, B, lr=0.1, seed=1, tile=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, X.shape[0], (K, B), generator=g)  # (K, B)
    lrs = torch.full((K,), lr, dtype=torch.float64)  # (K,)
    fn, reason = fast.load_fast_steps(cfg, torch.float32, tile=tile)
    assert fn is not None, reason
    pf, pe = p.clone(), p.clone()
    bf, be = model.init_bn_stats(cfg), model.init_bn_stats(cfg)
    with torch.no_grad():
        lf = fn(pf, bf, X, Y, idx, lrs, cfg.bn_momentum, True)
        le = train.eager_steps(pe, be, X, Y, idx, lrs, cfg.bn_momentum, True)
    return (lf, pf, bf), (le, pe, be)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_fast_losses_match_eager_over_300_steps(shape):
    B = shape[0]
    cfg, p, X, Y = _problem(*shape)
    (lf, pf, bf), (le, pe, be) = _run_both(cfg, p, X, Y, K=300, B=B)
    assert lf.dtype == torch.float64 and lf.shape == (300,)
    assert float((lf - le).abs().max()) <= 1e-4 * float(le.abs().max()), "per-step losses diverge"
    for (name, a), b in zip(pf.items(), pe.tensors()):
        assert _rel(a, b) <= 1e-3, name
    assert _rel(bf.mean, be.mean) <= 1e-4 and _rel(bf.var, be.var) <= 1e-4, "running statistics"


def test_real_data_reference_config_300_steps(names_splits):
    cfg = ModelConfig()
    p = model.init_params(cfg)
    (lf, pf, bf), (le, pe, be) = _run_both(cfg, p, names_splits.Xtr, names_splits.Ytr, K=300, B=32)
    assert float((lf - le).abs().max()) <= 1e-4
    assert _rel(bf.var, be.var) <= 1e-4 and _rel(bf.mean, be.mean) <= 1e-4


@pytest.mark.parametrize("tile", [1, 5, 16])
def test_checkpointing_gives_the_same_steps(tile):
    cfg, p, X, Y = _problem(37, 3, 6, 45, 11)
    (lf, pf, bf), _ = _run_both(cfg, p, X, Y, K=40, B=37, tile=0)
    (lc, pc, bc), _ = _run_both(cfg, p, X, Y, K=40, B=37, tile=tile)
    assert float((lf - lc).abs().max()) <= 1e-5
    for (name, a), b in zip(pc.items(), pf.tensors()):
        assert _rel(a, b) <= 1e-4, name
    assert _rel(bc.var, bf.var) <= 1e-4 and _rel(bc.mean, bf.mean) <= 1e-4, "running statistics"


def test_non_contiguous_params_are_updated_in_place():
    cfg, p, X, Y = _problem(9, 2, 3, 10, 7)
    p.W1 = p.W1.t().contiguous().t()  # same values, column-major
    ref = p.clone()
    (lf, pf, _), (le, pe, _) = _run_both(cfg, p, X, Y, K=5, B=9)
    assert not pf.W1.is_contiguous() and _rel(pf.W1, pe.W1) <= 1e-4 and _rel(ref.W1, p.W1) == 0


def test_non_contiguous_running_stats_are_updated_in_place():
    cfg, p, X, Y = _problem(9, 2, 3, 10, 7)
    fn, _ = fast.load_fast_steps(cfg, torch.float32)
    idx = torch.randint(0, X.shape[0], (5, 9), generator=torch.Generator().manual_seed(2))  # (5, 9)
    lrs = torch.full((5,), 0.1, dtype=torch.float64)
    be = model.init_bn_stats(cfg)
    bf = model.BNStats(*(t.t().repeat(1, 2)[:, 0][None] for t in (be.mean, be.var)))  # (1, H), stride 2
    assert not bf.mean.is_contiguous() and torch.equal(bf.var, be.var)
    with torch.no_grad():
        fn(p.clone(), bf, X, Y, idx, lrs, 0.1, True)
        train.eager_steps(p.clone(), be, X, Y, idx, lrs, 0.1, True)
    assert _rel(bf.mean, be.mean) <= 1e-4 and _rel(bf.var, be.var) <= 1e-4


# ---------------------------------------------------------------------------- non-finite values
def _both_raise(cfg, p, X, Y, idx, lrs):
    fn, _ = fast.load_fast_steps(cfg, torch.float32)
    errs, states = [], []
    for steps in (fn, train.eager_steps):
        q = p.clone()
        with pytest.raises(NonFiniteError) as ei, torch.no_grad():
            steps(q, model.init_bn_stats(cfg), X, Y, idx, lrs, 0.001, True)
        errs.append(ei.value)
        states.append(q)
    return errs, states


def test_nan_loss_is_named_loss():
    cfg, p, X, Y = _problem(16, 3, 4, 20, 9)
    p.b2[2] = float("nan")
    idx = torch.arange(16)[None]  # (1, 16)
    (ef, ee), _ = _both_raise(cfg, p, X, Y, idx, torch.ones(1, dtype=torch.float64))
    assert (ef.step, ef.tensor) == (ee.step, ee.tensor) == (0, "loss")


def test_inf_gradient_with_finite_loss_is_named():
    """An infinite gain saturates its tanh (finite loss) but makes 0 * inf = NaN in dhprebn, which
    reaches dC first in the order C, W1, b1, W2, b2, bngain, bnbias."""
    cfg, p, X, Y = _problem(16, 3, 4, 20, 9)
    p.bngain[0, 5] = float("inf")
    idx = torch.arange(16)[None]
    (ef, ee), _ = _both_raise(cfg, p, X, Y, idx, torch.ones(1, dtype=torch.float64))
    assert (ef.step, ef.tensor) == (ee.step, ee.tensor) == (0, "dC")
    assert "dC" in str(ef)


def test_overflowing_dW1_with_finite_loss_and_dC_is_named():
    """Batchnorm makes the loss invariant to W1's scale, but dW1 scales as 1/|W1| and dC as 1/|C|:
    a huge C and a (subnormal) tiny W1 overflow dW1 alone, the second tensor in the check order."""
    cfg, p, X, Y = _problem(16, 3, 4, 20, 9)
    p.C.mul_(3e37)
    p.W1.mul_(1e-41)
    idx = torch.arange(16)[None]
    (ef, ee), _ = _both_raise(cfg, p, X, Y, idx, torch.ones(1, dtype=torch.float64))
    assert (ef.step, ef.tensor) == (ee.step, ee.tensor) == (0, "dW1")


def test_divergence_raises_at_the_same_step_as_eager():
    cfg, p, X, Y = _problem(16, 3, 4, 20, 9)
    K = 200
    idx = torch.randint(0, X.shape[0], (K, 16), generator=torch.Generator().manual_seed(3))
    lrs = torch.full((K,), 1e30, dtype=torch.float64)  # blows up within a few steps
    (ef, ee), (qf, qe) = _both_raise(cfg, p, X, Y, idx, lrs)
    assert ef.step == ee.step and ef.tensor == ee.tensor
    for (name, a), b in zip(qf.items(), qe.tensors()):  # both hold the state before the bad step
        assert torch.equal(a.isfinite(), b.isfinite()), name


def test_out_of_range_indices_raise_index_error():
    cfg, p, X, Y = _problem(8, 2, 3, 10, 7)
    fn, _ = fast.load_fast_steps(cfg, torch.float32)
    idx = torch.zeros((3, 8), dtype=torch.long)
    idx[1, 4] = X.shape[0]  # one past the end, at step 1
    q = p.clone()
    with pytest.raises(IndexError):
        fn(q, None, X, Y, idx, torch.full((3,), 0.1, dtype=torch.float64), 0.001, True)
    assert not torch.equal(q.W1, p.W1)  # step 0 was applied, then it stopped
    X2 = X.clone()
    X2[0, 0] = 7  # a character id outside the vocabulary
    with pytest.raises(IndexError):
        fn(p.clone(), None, X2, Y, idx[:1], torch.full((1,), 0.1, dtype=torch.float64), 0.001, True)


def test_bad_arguments_raise_before_any_step():
    cfg, p, X, Y = _problem(8, 2, 3, 10, 7)
    fn, _ = fast.load_fast_steps(cfg, torch.float32)
    idx = torch.zeros((2, 8), dtype=torch.long)
    lr2 = torch.full((2,), 0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="lrs has 1 entries for 2 steps"):
        fn(p.clone(), None, X, Y, idx, lr2[:1], 0.001, True)
    with pytest.raises(ValueError, match="rows"):
        fn(p.clone(), None, X, Y[:-1], idx, lr2, 0.001, True)
    with pytest.raises(TypeError, match="float32"):
        fn(p.to(torch.float64), None, X, Y, idx, lr2, 0.001, True)
    with pytest.raises(ValueError, match="batchnorm"):
        fn(p.clone(), None, X, Y, idx, lr2, 0.001, False)
    q = p.clone()
    with pytest.raises(RuntimeError, match="unsupported dimensions"):  # batchnorm's n-1 needs B >= 2
        fn(q, None, X, Y, idx[:, :1], lr2, 0.001, True)
    assert all(torch.equal(a, b) for a, b in zip(q.tensors(), p.tensors()))


# ---------------------------------------------------------------------------- availability
def test_unsupported_configs_give_a_reason():
    fn, reason = fast.load_fast_steps(ModelConfig(), torch.float64)
    assert fn is None and "float32" in reason
    fn, reason = fast.load_fast_steps(ModelConfig(batchnorm=False), torch.float32)
    assert fn is None and "batchnorm" in reason
    fn, reason = fast.load_fast_steps(ModelConfig(vocab_size=129), torch.float32)
    assert fn is None and "vocab_size <= 128" in reason


def test_build_writes_one_library_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path))
    path = fast.build()
    assert path.parent == tmp_path and path.exists()
    assert [q.name for q in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
    assert fast.build() == path  # cached


def test_missing_compiler_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path))
    monkeypatch.setenv("HANDGRAD_CC", "/nonexistent/c++")
    fast._reset_for_tests()
    try:
        fn, reason = fast.load_fast_steps(ModelConfig(), torch.float32)
        assert fn is None and "compiler" in reason and "\n" not in reason
        mcfg = ModelConfig(n_hidden=20)
        tcfg = TrainConfig(steps=30, chunk_steps=10, batch_size=8)
        steps_fn, name, warning = train.select_engine(mcfg, tcfg)
        assert name == "eager" and steps_fn is train.eager_steps and "fast path unavailable" in warning
        with pytest.raises(RuntimeError, match="unavailable"):
            train.select_engine(mcfg, TrainConfig(engine="fast"))
        X = torch.randint(0, 27, (100, 3))
        splits = type("S", (), {"Xtr": X, "Ytr": torch.randint(0, 27, (100,))})()
        state = train.train(splits, mcfg, tcfg, steps_fn=steps_fn)
        assert state.step == 30 and bool(state.losses.isfinite().all())
    finally:
        fast._reset_for_tests()


def test_auto_engine_selects_fast():
    steps_fn, name, warning = train.select_engine(ModelConfig(), TrainConfig())
    assert name == "fast" and warning == ""


def test_unwritable_cache_falls_back(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("HANDGRAD_CACHE", str(blocker / "cache"))
    fast._reset_for_tests()
    try:
        fn, reason = fast.load_fast_steps(ModelConfig(), torch.float32)
        assert fn is None and "cache" in reason
    finally:
        fast._reset_for_tests()
