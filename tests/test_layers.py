"""Every built-in layer's hand-written backward against autograd (float64, tight) and against float64
central finite differences, across shapes (3-D batchnorm, batch 2) and seeds, with non-trivial
parameters; plus hand-computable cases, the Sequential's naming and the spec round trip."""

import copy

import pytest
import torch

from handgrad import layers
from handgrad.layers import (
    BatchNorm1d,
    Embedding,
    FlattenConsecutive,
    Linear,
    ReLU,
    Sequential,
    SpecError,
    Tanh,
    from_spec,
    set_tensor,
)
from user_layers import Scale

F64 = torch.float64


def _randomise(layer, g: torch.Generator) -> None:
    """Non-trivial parameters: no zeros or ones for a wrong backward to hide behind."""
    for name, t in layer.params().items():
        set_tensor(layer, name, torch.randn(t.shape, generator=g, dtype=F64) * 0.7 + 0.3)


def _loss_fn(layer, x, dout):
    """A scalar whose gradient w.r.t. the layer output is dout: sum(out * dout)."""
    out, _ = layer.forward(x, training=True)
    return (out * dout).sum()


def _autograd(layer, x, dout):
    params = layer.params()
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in params.items()}
    for k, t in leaves.items():
        set_tensor(layer, k, t)
    xl = x.detach().clone().requires_grad_(x.is_floating_point())
    try:
        loss = _loss_fn(layer, xl, dout)
        wrt = ([xl] if x.is_floating_point() else []) + list(leaves.values())
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    finally:
        for k, t in params.items():
            set_tensor(layer, k, t)
    dx = grads[0] if x.is_floating_point() else None
    named = dict(zip(leaves, grads[1:] if x.is_floating_point() else grads))
    return dx, named


def _finite_difference(f, t: torch.Tensor, eps: float = 1e-6, max_elements: int = 60) -> tuple[list, list]:
    """Central differences of the scalar f() w.r.t. up to max_elements entries of t (in place)."""
    flat = t.view(-1)
    idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:max_elements].tolist()
    values = []
    for i in idx:
        old = flat[i].item()
        flat[i] = old + eps
        up = f().item()
        flat[i] = old - eps
        down = f().item()
        flat[i] = old
        values.append((up - down) / (2 * eps))
    return idx, values


CASES = [
    # (id, layer factory, input factory (generator) -> x)
    ("linear-2d", lambda: Linear(7, 5), lambda g: torch.randn(6, 7, generator=g, dtype=F64)),
    ("linear-3d", lambda: Linear(6, 4), lambda g: torch.randn(5, 3, 6, generator=g, dtype=F64)),
    ("linear-nobias-3d", lambda: Linear(6, 4, bias=False), lambda g: torch.randn(2, 4, 6, generator=g, dtype=F64)),
    ("batchnorm-2d", lambda: BatchNorm1d(5), lambda g: torch.randn(16, 5, generator=g, dtype=F64) * 3 + 1),
    ("batchnorm-2d-batch2", lambda: BatchNorm1d(4), lambda g: torch.randn(2, 4, generator=g, dtype=F64)),
    ("batchnorm-3d", lambda: BatchNorm1d(6), lambda g: torch.randn(8, 4, 6, generator=g, dtype=F64) * 2 - 1),
    ("batchnorm-3d-batch2", lambda: BatchNorm1d(3), lambda g: torch.randn(2, 2, 3, generator=g, dtype=F64)),
    ("tanh", lambda: Tanh(), lambda g: torch.randn(9, 5, generator=g, dtype=F64) * 1.5),
    ("relu", lambda: ReLU(), lambda g: torch.randn(9, 3, 5, generator=g, dtype=F64)),
    ("flatten2", lambda: FlattenConsecutive(2), lambda g: torch.randn(4, 8, 3, generator=g, dtype=F64)),
    ("flatten-all", lambda: FlattenConsecutive(4), lambda g: torch.randn(3, 4, 5, generator=g, dtype=F64)),
    ("embedding", lambda: Embedding(7, 4, F64), lambda g: torch.randint(0, 7, (6, 5), generator=g)),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_layer_backward_matches_autograd_in_float64(case, seed):
    _, make, make_x = case
    g = torch.Generator().manual_seed(seed)
    layer = layers.from_spec(make().spec(), F64)
    _randomise(layer, g)
    x = make_x(g)
    if not x.is_floating_point():
        x[1] = x[0]  # repeated indices: the embedding gradient must accumulate
    out, cache = layer.forward(x)
    dout = torch.randn(out.shape, generator=g, dtype=F64)
    dx, grads = layer.backward(dout, cache)
    ref_dx, ref = _autograd(layer, x, dout)
    assert set(grads) == set(layer.params())
    if ref_dx is None:
        assert dx is None
    else:
        assert dx.shape == x.shape
        torch.testing.assert_close(dx, ref_dx, rtol=1e-10, atol=1e-12)
    for name, t in layer.params().items():
        assert grads[name].shape == t.shape, name
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_layer_backward_matches_finite_differences_in_float64(case, seed):
    _, make, make_x = case
    g = torch.Generator().manual_seed(100 + seed)
    layer = layers.from_spec(make().spec(), F64)
    _randomise(layer, g)
    x = make_x(g)
    if isinstance(layer, ReLU):  # keep away from the kink at 0, where the derivative is undefined
        x = x + 0.1 * torch.sign(x)
    out, cache = layer.forward(x)
    dout = torch.randn(out.shape, generator=g, dtype=F64)
    dx, grads = layer.backward(dout, cache)
    targets = dict(layer.params())
    if x.is_floating_point():
        targets["x"] = x
    for name, t in targets.items():
        analytic = dx if name == "x" else grads[name]
        idx, numeric = _finite_difference(lambda: _loss_fn(layer, x, dout), t)
        a = analytic.reshape(-1)[idx]
        n = torch.tensor(numeric, dtype=F64)
        assert ((a - n).abs() <= 1e-7 + 1e-5 * n.abs()).all(), (name, (a - n).abs().max().item())


def test_linear_over_leading_dims_sums_dW_over_every_position():
    lin = Linear(2, 1, bias=True, dtype=F64)
    lin.weight = torch.tensor([[2.0], [3.0]], dtype=F64)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)  # (1, 2, 2)
    out, cache = lin.forward(x)
    assert out.reshape(-1).tolist() == [2.0, 3.0]
    dx, g = lin.backward(torch.ones(1, 2, 1, dtype=F64), cache)
    assert g["weight"].reshape(-1).tolist() == [1.0, 1.0] and g["bias"].tolist() == [2.0]
    assert dx.tolist() == [[[2.0, 3.0], [2.0, 3.0]]]


def test_batchnorm_3d_reduces_over_batch_and_time_with_bessel():
    bn = BatchNorm1d(3, dtype=F64)
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out, (_, (mean, var)) = bn.forward(x)
    flat = x.reshape(-1, 3)
    torch.testing.assert_close(mean.reshape(-1), flat.mean(0))
    torch.testing.assert_close(var.reshape(-1), flat.var(0, unbiased=True))
    torch.testing.assert_close(out.reshape(-1, 3), (flat - flat.mean(0)) / (flat.var(0) + bn.eps).sqrt())


def test_batchnorm_eval_mode_uses_running_statistics_and_updates_with_momentum():
    bn = BatchNorm1d(2, momentum=0.25, dtype=F64)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=F64)
    _, cache = bn.forward(x)
    bn.update_buffers(cache)
    assert bn.running_mean.tolist() == [0.5, 1.0]  # 0.75 * 0 + 0.25 * (2, 4)
    assert bn.running_var.tolist() == [0.75 + 0.25 * 2.0, 0.75 + 0.25 * 8.0]  # n-1 variance (2, 8)
    out, cache = bn.forward(x, training=False)
    assert cache is None
    torch.testing.assert_close(out, (x - bn.running_mean) / (bn.running_var + bn.eps).sqrt())


def test_flatten_consecutive_is_a_view_not_a_copy():
    x = torch.randn(4, 8, 3)
    out, cache = FlattenConsecutive(2).forward(x)
    assert out.shape == (4, 4, 6) and out.data_ptr() == x.data_ptr()
    assert FlattenConsecutive(8).forward(x)[0].shape == (4, 24)  # a middle dimension of 1 is dropped
    with pytest.raises(ValueError, match="divisible"):
        FlattenConsecutive(3).forward(x)


def test_sequential_names_parameters_by_position_and_backprops_in_reverse():
    model = Sequential([Embedding(5, 2), FlattenConsecutive(3), Linear(6, 4), BatchNorm1d(4), Tanh(),
                        Linear(4, 5, bias=False)])
    assert list(model.params()) == ["0.weight", "2.weight", "2.bias", "3.weight", "3.bias", "5.weight"]
    assert list(model.buffers()) == ["3.running_mean", "3.running_var"]
    X = torch.randint(0, 5, (7, 3), generator=torch.Generator().manual_seed(0))
    logits, caches = model.forward(X)
    dx, grads = model.backward(torch.ones_like(logits), caches)
    assert dx is None and set(grads) == set(model.params())


def test_spec_round_trip_rebuilds_the_same_layers():
    model = Sequential([Embedding(5, 2), FlattenConsecutive(3), Linear(6, 4, bias=False),
                        BatchNorm1d(4, eps=1e-3, momentum=0.2), ReLU(), Linear(4, 5)])
    again = from_spec(copy.deepcopy(model.spec()), torch.float64)
    assert again.spec() == model.spec()
    assert {k: (tuple(t.shape), t.dtype) for k, t in again.params().items()} == \
        {k: (tuple(t.shape), torch.float64) for k, t in model.params().items()}


@pytest.mark.parametrize("spec, words", [
    ({"type": "os.system", "command": "true"}, "unknown layer type"),
    ({"type": "Linear", "fan_in": "3", "fan_out": 2}, "must be a number"),
    ({"type": "Linear", "fan_in": 10**12, "fan_out": 2}, "out of range"),
    ({"type": "Linear", "fan_in": 3}, "cannot build"),
    ({"type": "Sequential", "layers": []}, "non-empty list"),
    (["Linear"], "must be an object"),
])
def test_a_bad_spec_is_refused_in_one_line(spec, words):
    with pytest.raises(SpecError, match=words) as e:
        from_spec(spec)
    assert "\n" not in str(e.value)


def test_a_users_own_layer_plugs_into_sequential_and_specs():
    model = Sequential([Embedding(5, 3), FlattenConsecutive(2), Scale(6, 1.5), Linear(6, 5)])
    assert "2.s" in model.params()
    with pytest.raises(SpecError, match="layer_types"):
        from_spec(model.spec())
    again = from_spec(model.spec(), extra={"Scale": Scale})
    assert again.spec() == model.spec()
    with pytest.raises(TypeError, match="lacks"):
        Sequential([Embedding(5, 3), object()])
