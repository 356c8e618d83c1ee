"""The lecture's atomic graph (exercise 1) against autograd, and the closed forms in ops.py against
the atomic chain (exercises 2 and 3)."""

import dataclasses
import platform

import pytest
import torch

from handgrad import atomic, check, layers, models, ops

SHAPES = [(32, 3, 10, 64, 27), (7, 2, 3, 5, 4), (50, 4, 6, 33, 11)]  # N, T, E, H, V
# closed form vs the atomic chain: the same maths in another order, so a few ulps apart
CLOSED_FORM_TOL = pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(rtol=1e-5, atol=1e-7)),
                                                         (torch.float64, dict(rtol=1e-12, atol=1e-15))])


def problem(N, T, E, H, V, seed, dtype):
    p = atomic.init_params(atomic.LectureConfig(vocab_size=V, block_size=T, n_embd=E, n_hidden=H), seed, dtype)
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (N, T), generator=g)
    X[1] = X[0]  # a repeated context: dC must accumulate
    Y = torch.randint(0, V, (N,), generator=g)
    return p, X, Y


def manual_and_autograd(p, X, Y):
    _, ref = check._autograd_atomic(p, X, Y)
    with torch.no_grad():
        grads = atomic.backward(p, X, Y, atomic.forward(p, X, Y))
    return grads, ref


def test_intermediates_are_a_dataclass_with_the_lectures_names():
    names = [f.name for f in dataclasses.fields(atomic.Intermediates)]
    for name in ("emb", "embcat", "hprebn", "bnmeani", "bndiff", "bndiff2", "bnvar", "bnvar_inv", "bnraw",
                 "hpreact", "h", "logits", "logit_maxes", "norm_logits", "counts", "counts_sum",
                 "counts_sum_inv", "probs", "logprobs", "loss"):
        assert name in names
    assert len(atomic.GRAD_NAMES) == 26
    assert [f.name for f in dataclasses.fields(atomic.Grads)] == ["d" + n for n in atomic.GRAD_NAMES]


MLP_NAMES = {"C": "0.weight", "W1": "2.weight", "b1": "2.bias", "bngain": "3.weight", "bnbias": "3.bias",
             "W2": "5.weight", "b2": "5.bias"}


def mlp_of(p: atomic.Params):
    """The layer-library mlp holding the lecture's 7 tensors (gain and bias as (H,))."""
    V, E = p.C.shape
    TE, H = p.W1.shape
    model = models.layers_for(models.preset("mlp", vocab_size=V, block_size=TE // E, n_embd=E, n_hidden=H),
                              p.C.dtype)
    for lecture_name, name in MLP_NAMES.items():
        layers.set_tensor(model, name, getattr(p, lecture_name).reshape(model.params()[name].shape).clone())
    return model


def test_atomic_loss_equals_the_models_loss():
    p, X, Y = problem(32, 3, 10, 64, 27, 0, torch.float64)
    loss = models.loss_and_grads(mlp_of(p), X, Y).loss
    assert atomic.forward(p, X, Y).loss.item() == pytest.approx(loss.item(), rel=1e-14)


def test_lecture_setup_uses_non_trivial_init():
    p, X, Y = check.lecture_batch(42)
    assert X.shape == (32, 3) and Y.shape == (32,) and p.W1.shape == (30, 64)
    for t in (p.b1, p.W2, p.b2, p.bnbias):
        assert t.abs().min() > 0
    assert not torch.equal(p.bngain, torch.ones_like(p.bngain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
def test_all_26_atomic_gradients_match_autograd(shape, seed, dtype):
    grads, ref = manual_and_autograd(*problem(*shape, seed, dtype))
    rows = [check.compare(name, g, ref[name]) for name, g in grads.items()]
    assert len(rows) == 26
    assert all(r.passed for r in rows), [(r.name, r.diagnosis) for r in rows if not r.passed]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_max_relative_error_is_below_1e_10(shape, seed):
    grads, ref = manual_and_autograd(*problem(*shape, seed, torch.float64))
    for name, g in grads.items():
        assert check.compare(name, g, ref[name]).rel_err <= 1e-10, name


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="bit-exactness depends on the build's kernels; measured on x86-64 CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 42])
@pytest.mark.parametrize("shape", SHAPES)
def test_atomic_backward_is_bit_exact_with_autograd(shape, seed, dtype):
    grads, ref = manual_and_autograd(*problem(*shape, seed, dtype))
    assert [n for n, g in grads.items() if not torch.equal(g, ref[n])] == []


def test_lecture_check_reports_26_of_26_bit_exact_in_float32():
    report = check.run_lecture_check(torch.float32, 42)
    assert report.passed
    assert "26 of 26 bit-exact" in str(report)


def test_lecture_check_float64_passes_with_finite_differences_for_every_param_and_closed_form():
    report = check.run_lecture_check(torch.float64, 7)
    assert report.passed
    fd = report.sections[2].rows
    assert [r.name for r in fd][:7] == [f.name for f in dataclasses.fields(atomic.Params)]
    assert len(fd) == 9 and all(isinstance(r, check.FDResult) and r.passed for r in fd)
    assert max(r.rel_err for s in report.sections[:2] for r in s.rows) <= 1e-10


def test_logit_maxes_gradient_goes_to_the_argmax_that_max_returned_on_ties():
    p, X, Y = problem(8, 3, 4, 6, 5, 3, torch.float32)
    p.W2.zero_()  # every row of logits is b2 ...
    p.b2.copy_(torch.tensor([0.5, 2.0, 2.0, -1.0, 2.0]))  # ... with a three-way tie for the max
    f = atomic.forward(p, X, Y)
    grads, ref = manual_and_autograd(p, X, Y)
    assert torch.equal(grads.dlogits, ref["logits"])
    assert torch.equal(grads.dlogit_maxes, ref["logit_maxes"])
    ties = (f.logits == f.logit_maxes)  # (N, V)
    assert (ties.sum(1) == 3).all()


@CLOSED_FORM_TOL
@pytest.mark.parametrize("shape", SHAPES)
def test_closed_form_cross_entropy_backward_equals_the_atomic_chain(shape, dtype, tol):
    p, X, Y = problem(*shape, 0, dtype)
    f = atomic.forward(p, X, Y)
    grads = atomic.backward(p, X, Y, f)
    loss, cache = ops.cross_entropy_forward(f.logits, Y)
    torch.testing.assert_close(loss, f.loss, rtol=1e-5 if dtype == torch.float32 else 1e-13, atol=0)
    torch.testing.assert_close(ops.cross_entropy_backward(1.0, cache), grads.dlogits, **tol)


@CLOSED_FORM_TOL
@pytest.mark.parametrize("shape", SHAPES)
def test_closed_form_batchnorm_backward_equals_the_atomic_chain(shape, dtype, tol):
    p, X, Y = problem(*shape, 1, dtype)
    f = atomic.forward(p, X, Y)
    grads = atomic.backward(p, X, Y, f)
    hpreact, cache, (bnmeani, bnvar) = ops.batchnorm_forward(f.hprebn, p.bngain, p.bnbias)
    torch.testing.assert_close(hpreact, f.hpreact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bnvar, f.bnvar, rtol=1e-5, atol=0)
    dhprebn, dbngain, dbnbias = ops.batchnorm_backward(grads.dhpreact, cache)
    torch.testing.assert_close(dhprebn, grads.dhprebn, **tol)
    torch.testing.assert_close(dbngain, grads.dbngain, **tol)
    torch.testing.assert_close(dbnbias, grads.dbnbias, **tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_atomic_parameter_gradients_equal_the_models_closed_form_backward(shape):
    p, X, Y = problem(*shape, 2, torch.float64)
    grads = atomic.backward(p, X, Y, atomic.forward(p, X, Y)).params()
    closed = models.loss_and_grads(mlp_of(p), X, Y).grads
    for name, mine in grads.items():
        theirs = closed[MLP_NAMES[name]].reshape(mine.shape)
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-13, msg=name)


def test_atomic_backward_needs_no_autograd():
    p, X, Y = problem(7, 2, 3, 5, 4, 0, torch.float64)
    with torch.inference_mode():
        grads = atomic.backward(p, X, Y, atomic.forward(p, X, Y))
    assert all(not g.requires_grad for _, g in grads.items())


def replay_loss(p, X, Y, target, value):
    """The atomic forward again, step by step, with the intermediate `target` replaced by `value`
    and everything after it recomputed from it: its finite differences give d loss / d target."""
    n = X.shape[0]
    steps = [
        ("emb", lambda e: p.C[X]),
        ("embcat", lambda e: e["emb"].view(n, -1)),
        ("hprebn", lambda e: e["embcat"] @ p.W1 + p.b1),
        ("bnmeani", lambda e: 1 / n * e["hprebn"].sum(0, keepdim=True)),
        ("bndiff", lambda e: e["hprebn"] - e["bnmeani"]),
        ("bndiff2", lambda e: e["bndiff"] ** 2),
        ("bnvar", lambda e: 1 / (n - 1) * e["bndiff2"].sum(0, keepdim=True)),
        ("bnvar_inv", lambda e: (e["bnvar"] + ops.BN_EPS) ** -0.5),
        ("bnraw", lambda e: e["bndiff"] * e["bnvar_inv"]),
        ("hpreact", lambda e: p.bngain * e["bnraw"] + p.bnbias),
        ("h", lambda e: torch.tanh(e["hpreact"])),
        ("logits", lambda e: e["h"] @ p.W2 + p.b2),
        ("logit_maxes", lambda e: e["logits"].max(1, keepdim=True).values),
        ("norm_logits", lambda e: e["logits"] - e["logit_maxes"]),
        ("counts", lambda e: e["norm_logits"].exp()),
        ("counts_sum", lambda e: e["counts"].sum(1, keepdim=True)),
        ("counts_sum_inv", lambda e: e["counts_sum"] ** -1),
        ("probs", lambda e: e["counts"] * e["counts_sum_inv"]),
        ("logprobs", lambda e: e["probs"].log()),
    ]
    env = {}
    for name, fn in steps:
        env[name] = value if name == target else fn(env)
    return -env["logprobs"][torch.arange(n), Y].mean()


@pytest.mark.parametrize("shape, seed", [(SHAPES[0], 0), (SHAPES[1], 1)])
def test_every_atomic_intermediate_gradient_matches_finite_differences(shape, seed):
    p, X, Y = problem(*shape, seed, torch.float64)
    f = atomic.forward(p, X, Y)
    grads = atomic.backward(p, X, Y, f)
    assert torch.equal(replay_loss(p, X, Y, None, None), f.loss)  # the replay is the same forward
    names = {name for name, _ in f.differentiable()}
    for name, g in grads.items():
        if name in names:
            x = getattr(f, name).clone()
            res = check.finite_differences(lambda: replay_loss(p, X, Y, name, x), x, g, name,  # noqa: B023
                                           max_elements=128, seed=seed)
            assert res.passed, (name, res.worst_ratio, res.diagnosis)
