"""The native engine (engines/native.py + csrc/) against float64 autograd (one-step gradients) and the
eager engine of train.py (per-step losses over hundreds of steps, running statistics, non-finite detection);
activation checkpointing, argument errors, the build cache and the fallback to eager."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from handgrad import engines, models, native_cache, reference, train
from handgrad.engines import native
from handgrad.layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, ReLU, Sequential, Tanh
from handgrad.models import ModelConfig
from handgrad.train import NonFiniteError, TrainConfig

pytestmark = pytest.mark.skipif(not native.have_compiler(), reason="no C++ compiler: the fast path cannot be built")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one torch thread is faster and immune to a busy machine's oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# (B, T, E, H, V): the reference config, then shapes that are not multiples of the 16-float vector
SHAPES = [(32, 3, 10, 200, 27), (7, 2, 3, 17, 5), (33, 4, 5, 31, 19), (5, 2, 2, 3, 4), (50, 5, 7, 70, 40)]


def _mlp(B, T, E, H, V, seed=0, n=500):
    """A lecture MLP with a non-trivial init (W1 x1.3) and n random examples."""
    cfg = ModelConfig(vocab_size=V, block_size=T, n_embd=E, n_hidden=H, w1_scale=1.3)
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (n, T), generator=g)  # (n, T)
    Y = torch.randint(0, V, (n,), generator=g)  # (n,)
    return cfg, models.build(cfg, seed + 7), X, Y


def _copy(model):
    """A deep copy: its own parameters and buffers (strides kept)."""
    return copy.deepcopy(model)


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """max |a - b| relative to max |b| (or to a given scale)."""
    s = scale if scale is not None else float(b.abs().max())
    return float((a.double() - b.double()).abs().max()) / max(s, 1e-30)


def _plan(model, tile=0):
    """(the native engine for `model`, "") or (None, why there is none): engines.native_steps."""
    fn = engines.native_steps(model, TrainConfig(recompute_tile=tile))
    return (None, fn) if isinstance(fn, str) else (fn, "")


def _steps_fn(model, tile=0):
    fn, reason = _plan(model, tile=tile)
    assert fn is not None, reason
    return fn


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("tile", [0, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_grads_match_float64_autograd(shape, tile):
    cfg, m, X, Y = _mlp(*shape)
    B = shape[0]
    Xb, Yb = X[:B], Y[:B]
    before = {k: v.clone() for k, v in m.params().items()}
    loss, grads = native.fast_grads(m, Xb, Yb, tile=tile)
    assert all(torch.equal(v, before[k]) for k, v in m.params().items()), "fast_grads modified the model"
    ref = reference.autograd_grads(models.cast(_copy(m), torch.float64), Xb, Yb)  # float64 autograd
    assert abs(loss - float(ref.loss)) <= 1e-5 * abs(float(ref.loss))
    assert set(grads) == set(ref.grads)
    for name, r in ref.grads.items():
        g = grads[name]
        assert g.shape == r.shape, name
        # the bias in front of batchnorm has a zero gradient in exact arithmetic: use its weight's scale
        scale = float(ref.grads["2.weight"].abs().max()) if name == "2.bias" else None
        assert _rel(g, r, scale) <= 1e-5, f"d{name}: relative error {_rel(g, r, scale):.2e}"


def test_repeated_rows_accumulate_in_the_embedding_gradient():
    cfg, m, X, Y = _mlp(8, 3, 4, 20, 6)
    X = torch.randint(0, 2, (8, 3), generator=torch.Generator().manual_seed(5))  # rows 0, 1 only
    assert any(len(set(r.tolist())) < 3 for r in X)  # some context repeats a row
    _, grads = native.fast_grads(m, X, Y[:8])
    ref = reference.autograd_grads(models.cast(_copy(m), torch.float64), X, Y[:8])
    assert _rel(grads["0.weight"], ref.grads["0.weight"]) <= 1e-5
    assert float(grads["0.weight"][2:].abs().max()) == 0.0


# ---------------------------------------------------------------------------- many steps
def _run_both(model, X, Y, K, B, lr=0.1, seed=1, tile=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, X.shape[0], (K, B), generator=g)  # (K, B)
    lrs = torch.full((K,), lr, dtype=torch.float64)  # (K,)
    fn = _steps_fn(model, tile)
    mf, me = _copy(model), _copy(model)
    with torch.no_grad():
        lf = fn(mf, X, Y, idx, lrs)
        le = train.eager_steps(me, X, Y, idx, lrs)
    return (lf, mf), (le, me)


def _assert_states_close(a, b, rel):
    for name, t in {**a.params(), **a.buffers()}.items():
        other = {**b.params(), **b.buffers()}[name]
        assert _rel(t, other) <= rel, f"{name}: relative difference {_rel(t, other):.2e}"


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_fast_losses_match_eager_over_300_steps(shape):
    B = shape[0]
    cfg, m, X, Y = _mlp(*shape)
    (lf, mf), (le, me) = _run_both(m, X, Y, K=300, B=B)
    assert lf.dtype == torch.float64 and lf.shape == (300,)
    assert float((lf - le).abs().max()) <= 1e-4 * float(le.abs().max()), "per-step losses diverge"
    _assert_states_close(mf, me, 1e-3)


def test_real_data_reference_config_300_steps(names_splits):
    m = models.build(ModelConfig(), 42)
    (lf, mf), (le, me) = _run_both(m, names_splits.Xtr, names_splits.Ytr, K=300, B=32)
    assert float((lf - le).abs().max()) <= 1e-4
    assert _rel(mf.layers[3].running_var, me.layers[3].running_var) <= 1e-4
    assert _rel(mf.layers[3].running_mean, me.layers[3].running_mean) <= 1e-4


@pytest.mark.parametrize("tile", [1, 5, 16])
def test_checkpointing_gives_the_same_steps(tile):
    cfg, m, X, Y = _mlp(37, 3, 6, 45, 11)
    (lf, mf), _ = _run_both(m, X, Y, K=40, B=37, tile=0)
    (lc, mc), _ = _run_both(m, X, Y, K=40, B=37, tile=tile)
    assert float((lf - lc).abs().max()) <= 1e-5
    _assert_states_close(mc, mf, 1e-4)


def test_non_contiguous_params_and_buffers_are_updated_in_place():
    cfg, m, X, Y = _mlp(9, 2, 3, 10, 7)
    lin, bn = m.layers[2], m.layers[3]
    lin.weight = lin.weight.t().contiguous().t()  # same values, column-major
    bn.running_var = bn.running_var.repeat(2)[::2]  # stride 2
    ref = lin.weight.clone()
    (lf, mf), (le, me) = _run_both(m, X, Y, K=5, B=9)
    assert not mf.layers[2].weight.is_contiguous() and not mf.layers[3].running_var.is_contiguous()
    _assert_states_close(mf, me, 1e-4)
    assert torch.equal(ref, m.layers[2].weight)  # the original model was not touched


# ---------------------------------------------------------------------------- non-finite values
def _both_raise(model, X, Y, idx, lrs):
    fn = _steps_fn(model)
    errs, states = [], []
    for steps in (fn, train.eager_steps):
        q = _copy(model)
        with pytest.raises(NonFiniteError) as ei, torch.no_grad():
            steps(q, X, Y, idx, lrs)
        errs.append(ei.value)
        states.append(q)
    return errs, states


def test_nan_loss_is_named_loss():
    cfg, m, X, Y = _mlp(16, 3, 4, 20, 9)
    m.layers[5].bias[2] = float("nan")
    idx = torch.arange(16)[None]  # (1, 16)
    (ef, ee), _ = _both_raise(m, X, Y, idx, torch.ones(1, dtype=torch.float64))
    assert (ef.step, ef.tensor) == (ee.step, ee.tensor) == (0, "loss")


def test_inf_gradient_with_finite_loss_is_named():
    """An infinite gain saturates its tanh (finite loss) but makes 0 * inf = NaN in dhprebn, which
    reaches dW1 first in the order backward produces the gradients (last layer first)."""
    cfg, m, X, Y = _mlp(16, 3, 4, 20, 9)
    m.layers[3].weight[5] = float("inf")
    idx = torch.arange(16)[None]
    (ef, ee), _ = _both_raise(m, X, Y, idx, torch.ones(1, dtype=torch.float64))
    assert (ef.step, ef.tensor) == (ee.step, ee.tensor) == (0, "d2.weight")
    assert "d2.weight" in str(ef)


def test_overflowing_dW1_with_finite_loss_and_dC_is_named():
    """Batchnorm makes the loss invariant to W1's scale, but dW1 scales as 1/|W1| and dC as 1/|C|:
    a huge C and a (subnormal) tiny W1 overflow dW1 alone."""
    cfg, m, X, Y = _mlp(16, 3, 4, 20, 9)
    m.layers[0].weight.mul_(3e37)
    m.layers[2].weight.mul_(1e-41)
    idx = torch.arange(16)[None]
    (ef, ee), _ = _both_raise(m, X, Y, idx, torch.ones(1, dtype=torch.float64))
    assert (ef.step, ef.tensor) == (ee.step, ee.tensor) == (0, "d2.weight")


def test_divergence_raises_at_the_same_step_as_eager():
    cfg, m, X, Y = _mlp(16, 3, 4, 20, 9)
    K = 200
    idx = torch.randint(0, X.shape[0], (K, 16), generator=torch.Generator().manual_seed(3))
    lrs = torch.full((K,), 1e30, dtype=torch.float64)  # blows up within a few steps
    (ef, ee), (qf, qe) = _both_raise(m, X, Y, idx, lrs)
    assert ef.step == ee.step and ef.tensor == ee.tensor
    for name, a in qf.params().items():  # both hold the state before the bad step
        assert torch.equal(a.isfinite(), qe.params()[name].isfinite()), name


def test_out_of_range_indices_raise_index_error():
    cfg, m, X, Y = _mlp(8, 2, 3, 10, 7)
    fn = _steps_fn(m)
    idx = torch.zeros((3, 8), dtype=torch.long)
    idx[1, 4] = X.shape[0]  # one past the end, at step 1
    q = _copy(m)
    with pytest.raises(IndexError):
        fn(q, X, Y, idx, torch.full((3,), 0.1, dtype=torch.float64))
    assert not torch.equal(q.layers[2].weight, m.layers[2].weight)  # step 0 was applied, then it stopped
    X2 = X.clone()
    X2[0, 0] = 7  # a character id outside the vocabulary
    with pytest.raises(IndexError):
        fn(_copy(m), X2, Y, idx[:1], torch.full((1,), 0.1, dtype=torch.float64))


def test_bad_arguments_raise_before_any_step():
    cfg, m, X, Y = _mlp(8, 2, 3, 10, 7)
    fn = _steps_fn(m)
    idx = torch.zeros((2, 8), dtype=torch.long)
    lr2 = torch.full((2,), 0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="lrs has 1 entries for 2 steps"):
        fn(_copy(m), X, Y, idx, lr2[:1])
    with pytest.raises(ValueError, match="rows"):
        fn(_copy(m), X, Y[:-1], idx, lr2)
    q = _copy(m)
    with pytest.raises(RuntimeError, match="unsupported dimensions"):  # batchnorm's n-1 needs B >= 2
        fn(q, X, Y, idx[:, :1], lr2)
    assert all(torch.equal(v, m.params()[k]) for k, v in q.params().items())


# ---------------------------------------------------------------------------- availability
class Scale:
    """A user's own layer (out = 2 x): not a layer the native program knows."""

    def params(self):
        return {}

    def buffers(self):
        return {}

    def forward(self, x, training=True):
        return 2 * x, None

    def backward(self, dout, cache):
        return 2 * dout, {}

    def spec(self):
        return {"type": "Scale"}


def test_unsupported_models_give_a_one_line_reason():
    fn, reason = _plan(models.build(ModelConfig(), 0, torch.float64))
    assert fn is None and "float32" in reason
    fn, reason = _plan(models.build(ModelConfig(vocab_size=129), 0))
    assert fn is not None, reason  # beyond the MLP step's vocabulary: the native program runs it
    m = models.build(ModelConfig(), 0)
    user = Sequential([*m.layers[:4], Scale(), Tanh(), Linear(200, 27)])
    fn, reason = _plan(user)
    assert fn is None and "Scale" in reason and "\n" not in reason


def test_engine_fast_on_an_unknown_layer_is_an_error():
    m = models.build(ModelConfig(), 0)
    user = Sequential([*m.layers[:4], Scale(), Tanh(), Linear(200, 27)])
    steps_fn, name, warning = engines.plan(user, TrainConfig())
    assert name == "eager" and "Scale" in warning
    with pytest.raises(engines.EngineUnavailable, match="Scale"):
        engines.plan(user, TrainConfig(engine="fast"))


def test_build_writes_one_library_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path and path.exists()
    # no temporary files left behind: the library and its sha256
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted([path.name, native_cache.digest_path(path).name])
    assert native.build() == path  # cached


def test_missing_compiler_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path))
    monkeypatch.setenv("HANDGRAD_CC", "/nonexistent/c++")
    native._reset_for_tests()
    try:
        mcfg = ModelConfig(n_hidden=20)
        model = models.build(mcfg, 0)
        fn, reason = _plan(model)
        assert fn is None and "compiler" in reason and "\n" not in reason
        tcfg = TrainConfig(steps=30, chunk_steps=10, batch_size=8)
        steps_fn, name, warning = engines.plan(model, tcfg)
        assert name == "eager" and steps_fn is train.eager_steps and "fast path unavailable" in warning
        with pytest.raises(engines.EngineUnavailable, match="unavailable"):
            engines.plan(model, TrainConfig(engine="fast"))
        X = torch.randint(0, 27, (100, 3))
        splits = type("S", (), {"Xtr": X, "Ytr": torch.randint(0, 27, (100,))})()
        state = train.train(splits, mcfg, tcfg, steps_fn=steps_fn)
        assert state.step == 30 and bool(state.losses.isfinite().all())
    finally:
        native._reset_for_tests()


def test_auto_engine_selects_fast():
    steps_fn, name, warning = engines.plan(models.build(ModelConfig(), 0), TrainConfig())
    assert name == "fast" and warning == ""


def test_unwritable_cache_falls_back(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("HANDGRAD_CACHE", str(blocker / "cache"))
    native._reset_for_tests()
    try:
        fn, reason = _plan(models.build(ModelConfig(), 0))
        assert fn is None and "cache" in reason
    finally:
        native._reset_for_tests()


# ---------------------------------------------------------------------------- the native program
# (name, overrides, B): deep and wavenet at small sizes, widths that are not multiples of 16
PROGRAM_CASES = [("deep", dict(n_hidden=20, n_layers=3, block_size=3, n_embd=5, vocab_size=11), 13),
                 ("deep", dict(n_hidden=33, n_layers=2, block_size=4, n_embd=3, vocab_size=27), 32),
                 ("wavenet", dict(n_hidden=20, block_size=8, n_embd=6, vocab_size=11), 13),
                 ("wavenet", dict(n_hidden=17, block_size=4, n_embd=24, vocab_size=27), 32),
                 ("wavenet", dict(n_hidden=16, block_size=2, n_embd=16, vocab_size=5), 4)]


def _model(name, overrides, seed=0, n=300):
    """A preset model with makemore's init from `seed`, and n random examples."""
    cfg = models.preset(name, **overrides)
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, cfg.vocab_size, (n, cfg.block_size), generator=g)  # (n, T)
    Y = torch.randint(0, cfg.vocab_size, (n,), generator=g)  # (n,)
    return models.build(cfg, seed + 7), X, Y


def _perturb(model, seed):
    """Non-trivial batchnorm gains and biases (the init's ones and zeros hide wrong backward terms)."""
    g = torch.Generator().manual_seed(seed)
    for t in model.params().values():
        if t.dim() == 1:
            t.add_(torch.randn(t.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("tile", [0, 3])
@pytest.mark.parametrize("case", range(len(PROGRAM_CASES)))
@pytest.mark.parametrize("seed", [0, 1])
def test_program_grads_match_float64_autograd(case, tile, seed):
    name, overrides, B = PROGRAM_CASES[case]
    m, X, Y = _model(name, overrides, seed)
    _perturb(m, seed)
    assert native.mlp_view(m).__class__ is str  # not the MLP step: the program runs it
    before = {k: v.clone() for k, v in m.params().items()}
    loss, grads = native.fast_grads(m, X[:B], Y[:B], tile=tile)
    assert all(torch.equal(v, before[k]) for k, v in m.params().items()), "fast_grads modified the model"
    ref = reference.autograd_grads(models.cast(_copy(m), torch.float64), X[:B], Y[:B])
    assert abs(loss - float(ref.loss)) <= 1e-5 * abs(float(ref.loss))
    assert set(grads) == set(ref.grads)
    for k, r in ref.grads.items():
        assert grads[k].shape == r.shape, k
        assert _rel(grads[k], r) <= 2e-5, f"d{k}: relative error {_rel(grads[k], r):.2e}"


@pytest.mark.parametrize("tile", [0, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_program_biases_in_front_of_a_batchnorm(tile, seed):
    """A Linear with a bias right below a batchnorm (the lecture's b1): its db is summed in the
    batchnorm's dx pass. The batchnorm removes any shift, so that db is 0 up to rounding; every other
    gradient matches float64 autograd, with activation checkpointing too (db summed once per step)."""
    g = torch.Generator().manual_seed(seed)
    m = Sequential([Embedding(13, 5), FlattenConsecutive(3), Linear(15, 20), BatchNorm1d(20), Tanh(),
                    Linear(20, 17), BatchNorm1d(17), ReLU(), Linear(17, 13)])
    for t in m.params().values():
        t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t.dim() == 1 else 0.0))
    X, Y = torch.randint(0, 13, (40, 3), generator=g), torch.randint(0, 13, (40,), generator=g)
    loss, grads = native.fast_grads(m, X[:24], Y[:24], tile=tile)
    ref = reference.autograd_grads(models.cast(_copy(m), torch.float64), X[:24], Y[:24])
    assert abs(loss - float(ref.loss)) <= 1e-5 * abs(float(ref.loss))
    scale = max(float(r.abs().max()) for r in ref.grads.values())
    for k, r in ref.grads.items():
        if k in ("2.bias", "5.bias"):  # in front of a batchnorm: zero in exact arithmetic
            assert float(r.abs().max()) <= 1e-12 * scale and float(grads[k].abs().max()) <= 1e-6 * scale, k
        else:
            assert _rel(grads[k], r) <= 2e-5, f"d{k}: relative error {_rel(grads[k], r):.2e}"


@pytest.mark.parametrize("case", [0, 2, 3])
def test_program_losses_and_running_statistics_match_eager_over_200_steps(case):
    name, overrides, B = PROGRAM_CASES[case]
    m, X, Y = _model(name, overrides)
    (lf, mf), (le, me) = _run_both(m, X, Y, K=200, B=B)
    assert lf.dtype == torch.float64 and lf.shape == (200,)
    assert float((lf - le).abs().max()) <= 1e-5, "per-step losses diverge"
    _assert_states_close(mf, me, 1e-4)


@pytest.mark.parametrize("tile", [1, 4, 13])
def test_program_checkpointing_gives_the_same_steps(tile):
    name, overrides, _ = PROGRAM_CASES[2]
    m, X, Y = _model(name, overrides)
    (lf, mf), _ = _run_both(m, X, Y, K=30, B=29, tile=0)
    (lc, mc), _ = _run_both(m, X, Y, K=30, B=29, tile=tile)
    assert float((lf - lc).abs().max()) <= 1e-5
    _assert_states_close(mc, mf, 1e-4)


def test_flatten_is_a_reinterpretation_not_a_copy():
    """Every FlattenConsecutive of wavenet becomes an alias of the tensor before it: no op, no buffer."""
    m, X, _ = _model("wavenet", dict(n_hidden=20, block_size=8, n_embd=6))
    prog = native.compile_program(m, 8)
    nt, nop, _ = prog.counts
    tensors = [prog.body[5 * i:5 * i + 5] for i in range(nt)]
    aliases = [t for t in tensors if t[4] >= 0]
    assert len(aliases) == 3  # log2(8) flattens
    kinds = [prog.body[5 * nt + 6 * i] for i in range(nop)]
    # embedding, then (linear, batchnorm+tanh) x 3, then the output linear
    assert kinds == [native.OP_KINDS[k] for k in ["embed", *["linear", "bn_tanh"] * 3, "linear"]]
    assert [t[0] for t in aliases] == [4, 2, 1]  # rows per example after each flatten
    flat_bytes = native.workspace_bytes(m, 32, T=8)
    assert flat_bytes > 0


def test_user_model_with_relu_and_unfused_layers_matches_eager():
    """A stack the presets never build: ReLU, batchnorm not followed by tanh, a Linear over (N, t, C),
    tanh on its own."""
    g = torch.Generator().manual_seed(4)
    V = 9
    model = Sequential([Embedding(V, 5), FlattenConsecutive(2), Linear(10, 24), ReLU(), BatchNorm1d(24),
                        FlattenConsecutive(2), Linear(48, 12, bias=False), Tanh(), Linear(12, V)])
    model.init_(g)
    model.layers[4].weight.add_(0.3)
    X = torch.randint(0, V, (100, 4), generator=g)
    Y = torch.randint(0, V, (100,), generator=g)
    loss, grads = native.fast_grads(model, X[:10], Y[:10])
    ref = reference.autograd_grads(models.cast(_copy(model), torch.float64), X[:10], Y[:10])
    for k, r in ref.grads.items():
        assert _rel(grads[k], r) <= 2e-5, k
    (lf, mf), (le, me) = _run_both(model, X, Y, K=100, B=10)
    assert float((lf - le).abs().max()) <= 1e-5
    _assert_states_close(mf, me, 1e-4)


def test_program_shape_mismatch_is_a_one_line_error():
    model = Sequential([Embedding(7, 4), FlattenConsecutive(3), Linear(10, 7)])  # 3 x 4 = 12, not 10
    fn = _steps_fn(model)
    X, Y = torch.zeros((5, 3), dtype=torch.long), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="fan_in 10 but its input has 12"):
        fn(model, X, Y, torch.zeros((1, 4), dtype=torch.long), torch.ones(1, dtype=torch.float64))


def test_program_non_finite_gradient_is_named_as_eager_names_it():
    name, overrides, B = PROGRAM_CASES[0]
    m, X, Y = _model(name, overrides)
    m.layers[6].weight[3] = float("inf")  # the second batchnorm's gain
    idx = torch.arange(B)[None]
    (ef, ee), _ = _both_raise(m, X, Y, idx, torch.ones(1, dtype=torch.float64))
    assert (ef.step, ef.tensor) == (ee.step, ee.tensor)
    K = 100
    m, X, Y = _model(name, overrides)
    idx = torch.randint(0, X.shape[0], (K, B), generator=torch.Generator().manual_seed(3))
    (ef, ee), (qf, qe) = _both_raise(m, X, Y, idx, torch.full((K,), 1e30, dtype=torch.float64))
    assert (ef.step, ef.tensor) == (ee.step, ee.tensor)
    for k, a in qf.params().items():
        assert torch.equal(a.isfinite(), qe.params()[k].isfinite()), k


def test_program_index_error_names_the_step():
    m, X, Y = _model(*PROGRAM_CASES[2][:2])
    idx = torch.zeros((3, 8), dtype=torch.long)
    idx[2, 1] = X.shape[0]
    with pytest.raises(IndexError, match="at step 2"):
        _steps_fn(m)(_copy(m), X, Y, idx, torch.full((3,), 0.1, dtype=torch.float64))


@pytest.mark.parametrize("name", ["deep", "wavenet"])
def test_auto_engine_runs_deep_and_wavenet_natively(name):
    steps_fn, engine, warning = engines.plan(models.build(models.preset(name), 0), TrainConfig())
    assert engine == "fast" and warning == ""


def test_program_training_resumes_bit_identically():
    """Chunks of the same size give the same bits whether run in one train() call or two."""
    mcfg = models.preset("wavenet", n_hidden=16, block_size=4, n_embd=5, vocab_size=9)
    g = torch.Generator().manual_seed(2)
    splits = type("S", (), {"Xtr": torch.randint(0, 9, (300, 4), generator=g),
                            "Ytr": torch.randint(0, 9, (300,), generator=g)})()
    full = engines.fit(splits, mcfg, TrainConfig(steps=60, chunk_steps=20, batch_size=8, engine="fast"))
    half = engines.fit(splits, mcfg, TrainConfig(steps=40, chunk_steps=20, batch_size=8, engine="fast"))
    again = engines.fit(splits, mcfg, TrainConfig(steps=60, chunk_steps=20, batch_size=8, engine="fast"),
                        state=half)
    assert torch.equal(full.losses, again.losses)
    for k, t in {**full.model.params(), **full.model.buffers()}.items():
        assert torch.equal(t, {**again.model.params(), **again.model.buffers()}[k]), k


@pytest.mark.parametrize("name", ["deep", "wavenet"])
def test_cli_verify_autograd_on_the_fast_engine_agrees_over_200_steps(name, capsys, tmp_path):
    """`handgrad train --verify-autograd 200 --engine fast` at the model's preset sizes on names.txt: the
    native program's per-step losses agree with autograd's within 1e-5 (float32) from the same init and
    batches; the reported maximum is re-derived from the printed table's bound."""
    from handgrad.cli import main

    rc = main(["train", "--model", name, "--engine", "fast", "--verify-autograd", "200", "--out",
               str(tmp_path / name)])
    out = capsys.readouterr().out
    assert "fast engine" in out, out
    last = out.strip().splitlines()[-1]
    assert rc == 0 and last.endswith("AGREE"), out
    worst = float(last.split("difference| ")[1].split()[0])
    assert 0 < worst <= 1e-5  # float32 rounding differs (a zero would mean the same code ran twice)


def test_profile_phases_add_up_to_at_most_the_step():
    m, X, Y = _model("wavenet", dict(n_hidden=20, block_size=8, n_embd=6))
    idx = torch.randint(0, X.shape[0], (5, 16), generator=torch.Generator().manual_seed(0))  # (5, 16)
    prof = native.profile_program(m, X, Y, idx, torch.full((5,), 0.1, dtype=torch.float64))
    assert set(prof) == set(native.PROFILE_PHASES) and all(v >= 0 for v in prof.values())
    parts = sum(v for k, v in prof.items() if k != "step")
    assert prof["linear"] > 0 and prof["linear dx"] > 0 and 0 < parts <= prof["step"] * 1.001


def test_two_threads_give_bit_identical_steps_at_a_large_batch():
    """At batch 256 wavenet's middle products exceed program.cpp's threshold and are split over two
    threads; every element is summed in the same order, so losses and parameters are bit-identical."""
    m, X, Y = _model("wavenet", dict(n_hidden=128, block_size=8, n_embd=24), n=600)
    idx = torch.randint(0, X.shape[0], (3, 256), generator=torch.Generator().manual_seed(3))  # (3, 256)
    lrs = torch.full((3,), 0.1, dtype=torch.float64)  # (3,)
    lib = native.load_program_library()
    runs = []
    for threads in (1, 2):
        mt = _copy(m)
        runs.append((native.make_program_fn(lib, threads=threads)(mt, X, Y, idx, lrs), mt))
    (l1, m1), (l2, m2) = runs
    assert torch.equal(l1, l2) and bool(torch.isfinite(l1).all())
    assert all(torch.equal(a, b) for a, b in zip(m1.params().values(), m2.params().values()))
    name = next(iter(m.params()))
    assert not torch.equal(m1.params()[name], m.params()[name])  # the steps did update the model
    assert 2 * 256 * 256 * 128 >= native.load_program_library().hg_program_par_min_macs()  # layer 2 is split


def test_a_corrupt_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """A truncated .so in the cache (a killed copy, a full disk) would crash dlopen with SIGBUS or
    fail to load on every run; build() checks the cached bytes against the sha256 it wrote."""
    import subprocess
    import sys

    try:
        native_cache.compiler()
    except native_cache.NativeUnavailable:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path))
    path = native.build()
    size = path.stat().st_size
    assert not native_cache.cached_problem(path)
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert native_cache.cached_problem(path)
    assert native.build() == path and path.stat().st_size == size and not native_cache.cached_problem(path)
    probe = f"import ctypes; ctypes.CDLL({str(path)!r}).hg_abi_version()"
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0
    native_cache.digest_path(path).unlink()  # a cache from before the digests: rebuilt once, then trusted
    assert native_cache.cached_problem(path) and native.build() == path and not native_cache.cached_problem(path)


# ---------------------------------------------------------------------------- large batches: counted, tiled
def _large_mlp(n_hidden=24, n=9000):
    cfg, model, X, Y = _mlp(8, 3, 10, n_hidden, 27, seed=3, n=n)
    return cfg, model, X, Y


@pytest.mark.parametrize("batch, tile, want", [
    (32, 0, "fused"), (engines.COUNTED_ROWS // 2, 0, "fused"), (engines.COUNTED_ROWS // 2, 64, "fused"),
    (engines.COUNTED_ROWS, 0, engines.CACHE_TILE), (engines.COUNTED_ROWS, 1000, 1000)])
def test_the_mlp_engine_counts_in_cache_tiles_from_counted_rows(batch, tile, want):
    """train.select_engine for the lecture MLP: below engines.COUNTED_ROWS examples per step the fused step
    (with the tile asked for); from there the native program with its first batchnorm counted and
    deferred, in tiles of engines.CACHE_TILE or of the --recompute-tile asked for: the same bits, 2 SGD
    steps, as that step run directly, and not the other's."""
    _, model, X, Y = _large_mlp()
    idx = torch.randint(0, X.shape[0], (2, batch), generator=torch.Generator().manual_seed(0))
    lrs = torch.full((2,), 0.1, dtype=torch.float64)
    lib = native.load_program_library()
    fused = native.make_steps_fn(native.load_library(), tile)
    counted = native.make_program_fn(lib, want if want != "fused" else tile, count=True)
    chosen = engines.plan(model, TrainConfig(batch_size=batch, recompute_tile=tile))[0]
    after = {}
    for what, steps in {"chosen": chosen, "fused": fused, "counted": counted}.items():
        m = _copy(model)
        with torch.no_grad():
            steps(m, X, Y, idx, lrs)
        after[what] = torch.cat([t.flatten() for t in m.params().values()])
    other = "counted" if want == "fused" else "fused"
    assert torch.equal(after["chosen"], after["fused" if want == "fused" else "counted"])
    assert not torch.equal(after["chosen"], after[other])


def test_cache_tiles_only_for_the_lecture_mlp():
    """engines.cache_tile: the tile asked for always; else CACHE_TILE for the lecture MLP from TILE_ROWS
    rows per process (its counted tiled step is one pass); never for deep or wavenet, whose tiles cost a
    pass per later batchnorm (activation checkpointing, only when asked)."""
    mlp = models.build(ModelConfig(), 0)
    assert engines.cache_tile(mlp, engines.TILE_ROWS - 1) == 0
    assert engines.cache_tile(mlp, engines.TILE_ROWS) == engines.CACHE_TILE
    assert engines.cache_tile(mlp, 10 ** 6, 300) == 300 and engines.cache_tile(mlp, 32, 8) == 8
    for name in ("deep", "wavenet"):
        assert engines.cache_tile(models.build(models.preset(name), 0), 10 ** 6) == 0
    assert engines.cache_tile(models.build(ModelConfig(), 0, torch.float64), 10 ** 6) == 0


def test_the_counted_engine_trains_as_autograd_does():
    """handgrad train's engine at engines.COUNTED_ROWS examples per step (the counted program in tiles)
    against autograd from the same init on the same batches: per-step losses within float32 rounding,
    and a run split into two train() calls gives the same bits as one."""
    cfg, _, X, Y = _large_mlp()
    splits = type("S", (), {"Xtr": X, "Ytr": Y})()
    tcfg = TrainConfig(steps=12, chunk_steps=4, batch_size=engines.COUNTED_ROWS, lr=0.5)
    hand = engines.fit(splits, cfg, tcfg)
    ref = train.train(splits, cfg, tcfg, steps_fn=reference.autograd_steps)
    assert float((hand.losses - ref.losses).abs().max()) <= 1e-5
    half = engines.fit(splits, cfg, dataclasses.replace(tcfg, steps=8))
    rest = engines.fit(splits, cfg, tcfg, state=half)
    assert torch.equal(rest.losses, hand.losses)
    assert all(torch.equal(a, b) for a, b in zip(rest.model.params().values(), hand.model.params().values()))


@pytest.mark.parametrize("bad", ["character", "row"])
def test_the_counted_engine_stops_at_a_bad_index_and_keeps_the_state_before_it(bad):
    """The counted program (handgrad train's engine from engines.COUNTED_ROWS) reads every row of the batch
    to count it before any forward: a character outside the vocabulary in one row of step 1, or a row
    outside Xtr there, stops at step 1 with IndexError, the parameters those after step 0."""
    _, model, X, Y = _large_mlp()
    idx = torch.randint(0, X.shape[0], (3, engines.COUNTED_ROWS), generator=torch.Generator().manual_seed(2))
    lrs = torch.full((3,), 0.1, dtype=torch.float64)
    X = X.clone()
    if bad == "character":
        X[idx[1, 100], 2] = 27  # vocab 27: ids 0..26
    else:
        idx[1, 100] = X.shape[0]
    steps = engines.plan(model, TrainConfig(batch_size=engines.COUNTED_ROWS))[0]
    before = _copy(model)
    with torch.no_grad():
        steps(before, X, Y, idx[:1], lrs[:1])
        with pytest.raises(IndexError, match="at step 1"):
            steps(model, X, Y, idx, lrs)
    assert all(torch.equal(model.params()[k], v) for k, v in before.params().items())
