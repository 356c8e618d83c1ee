"""The op pairs of makemore's zoo (ops.py): each backward against autograd and float64 finite
differences (handgrad.check.check_backward) over several shapes and seeds with random weights and
biases; forwards against PyTorch's own modules; the causal mask's zero gradients; one hand-computable
case per op."""

import math

import pytest
import torch
import torch.nn.functional as F

from handgrad import ops
from handgrad.check import check_backward

SEEDS = [0, 1, 2]
SEQ_SHAPES = [(1, 1, 3), (2, 5, 4), (3, 4, 6)]  # (B, T, C)


def randn(seed, *shape, scale=1.0, shift=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def assert_passed(report):
    assert report.passed, str(report)


# ---------------------------------------------------------------------------- layernorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SEQ_SHAPES + [(5, 7)], ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_layernorm_backward_matches_autograd_and_finite_differences(shape, seed, dtype):
    C = shape[-1]
    inputs = {"x": randn(seed, *shape, scale=2.0, shift=0.7, dtype=dtype),
              "w": randn(seed + 10, C, scale=0.5, shift=1.0, dtype=dtype),
              "b": randn(seed + 20, C, dtype=dtype)}
    assert_passed(check_backward(ops.layernorm_forward, ops.layernorm_backward, inputs, seed=seed))


def test_layernorm_forward_is_torchs_and_a_hand_computed_row():
    x, w, b = randn(0, 3, 4, 5), randn(1, 5), randn(2, 5)
    out, _ = ops.layernorm_forward(x, w, b)
    assert torch.allclose(out, F.layer_norm(x, (5,), w, b, eps=1e-5), atol=1e-12)
    # [1, 2, 3]: mean 2, biased variance 2/3, so xhat = (-1, 0, 1) * sqrt(3/2) (eps 0)
    row, _ = ops.layernorm_forward(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), torch.ones(3,
                                   dtype=torch.float64), torch.zeros(3, dtype=torch.float64), eps=0.0)
    assert torch.allclose(row, torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64) * math.sqrt(1.5))


def test_layernorm_dx_of_a_row_sums_to_zero_and_is_orthogonal_to_xhat():
    """The closed form's two mean terms: shifting a row or scaling it about its mean changes nothing
    after normalisation, so dx has zero sum and zero dot with xhat, per row (w = 1)."""
    x = randn(3, 4, 6, scale=3.0)
    out, cache = ops.layernorm_forward(x, torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64),
                                       eps=0.0)
    dx, _, _ = ops.layernorm_backward(randn(4, 4, 6), cache)
    assert dx.sum(-1).abs().max() < 1e-12 and (dx * cache[0]).sum(-1).abs().max() < 1e-12


# ---------------------------------------------------------------------------- gelu
@pytest.mark.parametrize("shape", [(7,), (2, 3, 8), (4, 16)], ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_gelu_backward_matches_autograd_and_finite_differences(shape, seed):
    assert_passed(check_backward(ops.gelu_forward, ops.gelu_backward, {"x": randn(seed, *shape, scale=2.0)},
                                 seed=seed))


def test_gelu_is_torchs_tanh_approximation_and_its_slope_at_zero_is_one_half():
    x = randn(0, 50, scale=3.0)
    assert torch.allclose(ops.gelu_forward(x)[0], F.gelu(x, approximate="tanh"), atol=1e-12)
    zero = torch.zeros(1, dtype=torch.float64)
    assert ops.gelu_backward(torch.ones(1, dtype=torch.float64), ops.gelu_forward(zero)[1]).item() == 0.5


# ---------------------------------------------------------------------------- attention
def qkv(seed, B, nh, T, hs, dtype=torch.float64):
    return {"q": randn(seed, B, nh, T, hs, dtype=dtype), "k": randn(seed + 1, B, nh, T, hs, dtype=dtype),
            "v": randn(seed + 2, B, nh, T, hs, scale=1.5, dtype=dtype)}


@pytest.mark.parametrize("keep_att", [True, False], ids=["att cached", "att recomputed"])
@pytest.mark.parametrize("dims", [(1, 1, 1, 2), (2, 1, 4, 3), (2, 3, 5, 2)], ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_attention_backward_matches_autograd_and_finite_differences(dims, seed, keep_att):
    def forward(q, k, v):
        return ops.attention_forward(q, k, v, keep_att)
    assert_passed(check_backward(forward, ops.attention_backward, qkv(seed, *dims), seed=seed))


def test_attention_forward_is_torchs_causal_attention():
    t = qkv(0, 2, 3, 6, 4)
    y, _ = ops.attention_forward(t["q"], t["k"], t["v"])
    assert torch.allclose(y, F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True), atol=1e-12)


def test_the_masked_scores_get_exactly_zero_gradient():
    scores = randn(0, 2, 5, 5)
    att, cache = ops.causal_softmax_forward(scores)
    dscores = ops.causal_softmax_backward(randn(1, 2, 5, 5), cache)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert (att[:, future] == 0).all() and (dscores[:, future] == 0).all()
    assert not (dscores[:, ~future] == 0).all()
    assert torch.allclose(att.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    # row 0 attends to itself only: its softmax is 1 and its gradient 0 whatever datt is
    assert (att[:, 0, 0] == 1).all() and (dscores[:, 0] == 0).all()


@pytest.mark.parametrize("t0", [0, 2, 4])
def test_the_future_never_reaches_the_past_in_attention(t0):
    """dy at position t0 alone: q gets a gradient only at t0, k and v only at positions <= t0."""
    T = 5
    t = qkv(3, 2, 2, T, 3)
    _, cache = ops.attention_forward(t["q"], t["k"], t["v"])
    dy = torch.zeros(2, 2, T, 3, dtype=torch.float64)
    dy[:, :, t0] = randn(4, 2, 2, 3)
    dq, dk, dv = ops.attention_backward(dy, cache)
    others = [s for s in range(T) if s != t0]
    assert (dq[:, :, others] == 0).all() and (dk[:, :, t0 + 1:] == 0).all() and (dv[:, :, t0 + 1:] == 0).all()
    assert (dv[:, :, :t0 + 1] != 0).any(dim=-1).all()  # every position up to t0 is attended to
    if t0 > 0:
        assert (dk[:, :, :t0 + 1] != 0).any()


@pytest.mark.parametrize("n_head", [1, 2, 4])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_multihead_attention_backward_matches_autograd_and_finite_differences(n_head, seed):
    def forward(qkv):
        return ops.multihead_attention_forward(qkv, n_head)
    x = randn(seed, 2, 4, 3 * 4)
    assert_passed(check_backward(forward, ops.multihead_attention_backward, {"qkv": x}, seed=seed))


def test_split_and_merge_heads_undo_each_other_and_head_h_reads_its_channels():
    x = randn(0, 2, 3, 8)
    heads = ops.split_heads(x, 4)  # (2, 4, 3, 2)
    assert heads.shape == (2, 4, 3, 2) and torch.equal(heads[:, 1], x[:, :, 2:4])
    assert torch.equal(ops.merge_heads(heads), x)


# ---------------------------------------------------------------------------- positions, bag of words
@pytest.mark.parametrize("shape, block_size", [((1, 1, 3), 1), ((2, 3, 4), 5), ((3, 5, 2), 5)], ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_position_embedding_backward_matches_autograd_and_finite_differences(shape, block_size, seed):
    inputs = {"x": randn(seed, *shape), "wpe": randn(seed + 1, block_size, shape[-1])}
    report = check_backward(ops.position_embedding_forward, ops.position_embedding_backward, inputs, seed=seed)
    assert_passed(report)
    _, dwpe = ops.position_embedding_backward(randn(seed, *shape), (shape[1], block_size))
    assert (dwpe[shape[1]:] == 0).all()  # the positions a shorter sequence does not reach


def test_a_sequence_longer_than_the_block_size_is_refused():
    with pytest.raises(ValueError, match="6 positions is longer than the block size 4"):
        ops.position_embedding_forward(randn(0, 2, 6, 3), randn(1, 4, 3))


@pytest.mark.parametrize("shape", SEQ_SHAPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_causal_average_backward_matches_autograd_and_finite_differences(shape, seed):
    assert_passed(check_backward(ops.causal_average_forward, ops.causal_average_backward,
                                 {"x": randn(seed, *shape, shift=0.5)}, seed=seed))


def test_causal_average_is_makemores_masked_softmax_of_zeros():
    x = randn(0, 2, 6, 3)
    T = x.shape[1]
    att = torch.zeros(T, T, dtype=torch.float64).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                             float("-inf")).softmax(-1)  # (T, T)
    assert torch.allclose(ops.causal_average_forward(x)[0], att @ x, atol=1e-14)
    # by hand: position 2 is the mean of the first three
    assert torch.allclose(ops.causal_average_forward(x)[0][:, 2], x[:, :3].mean(1))


def test_the_future_never_reaches_the_past_in_the_bag_of_words():
    dy = torch.zeros(2, 5, 3, dtype=torch.float64)
    dy[:, 2] = 1.0
    _, cache = ops.causal_average_forward(randn(0, 2, 5, 3))
    dx = ops.causal_average_backward(dy, cache)
    assert (dx[:, 3:] == 0).all() and torch.allclose(dx[:, :3], torch.full((2, 3, 3), 1 / 3, dtype=torch.float64))


# ---------------------------------------------------------------------------- recurrent cells
def cell_inputs(cell, seed, B, E, H, dtype=torch.float64):
    inputs = {"xt": randn(seed, B, E, dtype=dtype), "hprev": randn(seed + 1, B, H, scale=0.8, dtype=dtype)}
    names = ["W", "b"] if cell == "rnn" else ["Wz", "bz", "Wr", "br", "Wh", "bh"]
    for i, n in enumerate(names):
        shape = (E + H, H) if n.startswith("W") else (H,)
        inputs[n] = randn(seed + 2 + i, *shape, scale=0.6 if n.startswith("W") else 0.4, dtype=dtype)
    return inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("cell", ["rnn", "gru"])
@pytest.mark.parametrize("dims", [(1, 1, 1), (3, 2, 4), (2, 5, 3)], ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_cell_backward_matches_autograd_and_finite_differences(cell, dims, seed, dtype):
    forward, backward = ops.CELLS[cell]
    assert_passed(check_backward(forward, backward, cell_inputs(cell, seed, *dims, dtype=dtype), seed=seed))


@pytest.mark.parametrize("cell", ["rnn", "gru"])
@pytest.mark.parametrize("dims", [(1, 1, 2, 2), (2, 5, 3, 4)], ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_backpropagation_through_time_matches_autograd_and_finite_differences(cell, dims, seed):
    B, T, E, H = dims
    weights = {k: v for k, v in cell_inputs(cell, seed, B, E, H).items() if k not in ("xt", "hprev")}
    inputs = {"x": randn(seed + 9, B, T, E), "start": randn(seed + 8, 1, H, scale=0.5), **weights}

    def forward(x, start, *ws):
        return ops.recurrence_forward(x, start, cell, *ws)

    def backward(dh, cache):
        dx, dstart, dws = ops.recurrence_backward(dh, cache)
        return (dx, dstart, *dws)
    assert_passed(check_backward(forward, backward, inputs, seed=seed))


def test_the_future_never_reaches_the_past_through_time():
    """A gradient at position t reaches the inputs at positions <= t only (the start state always)."""
    inputs = cell_inputs("gru", 0, 2, 3, 4)
    ws = [v for k, v in inputs.items() if k not in ("xt", "hprev")]
    _, cache = ops.recurrence_forward(randn(1, 2, 5, 3), randn(2, 1, 4), "gru", *ws)
    dh = torch.zeros(2, 5, 4, dtype=torch.float64)
    dh[:, 2] = 1.0
    dx, dstart, _ = ops.recurrence_backward(dh, cache)
    assert (dx[:, 3:] == 0).all() and (dx[:, :3] != 0).any(-1).all() and (dstart != 0).any()


def test_an_rnn_cell_by_hand():
    """E = H = 1, W = (2, 1) ones, b = 0: h = tanh(x + h_prev); dh/dx = dh/dh_prev = 1 - h^2."""
    one = torch.ones(1, 1, dtype=torch.float64)
    h, cache = ops.rnn_cell_forward(0.3 * one, 0.2 * one, torch.ones(2, 1, dtype=torch.float64),
                                    torch.zeros(1, dtype=torch.float64))
    assert math.isclose(h.item(), math.tanh(0.5))
    dx, dh, dW, db = ops.rnn_cell_backward(one, cache)
    slope = 1 - math.tanh(0.5) ** 2
    assert math.isclose(dx.item(), slope) and math.isclose(dh.item(), slope) and math.isclose(db.item(), slope)
    assert torch.allclose(dW, torch.tensor([[0.3], [0.2]], dtype=torch.float64) * slope)


def test_a_gru_whose_switch_is_shut_keeps_its_state():
    """z = sigmoid(-40) ~ 0: h = h_prev, and dh_prev = dh (up to the tiny gate)."""
    inputs = cell_inputs("gru", 0, 2, 3, 4)
    inputs["Wz"] = torch.zeros_like(inputs["Wz"])
    inputs["bz"] = torch.full_like(inputs["bz"], -40.0)
    h, cache = ops.gru_cell_forward(*inputs.values())
    assert torch.allclose(h, inputs["hprev"], atol=1e-15)
    dh = randn(5, 2, 4)
    assert torch.allclose(ops.gru_cell_backward(dh, cache)[1], dh, atol=1e-15)


# ---------------------------------------------------------------------------- context windows
def test_context_windows_by_hand():
    X = torch.tensor([[0, 5, 6], [0, 1, 2]])
    W = ops.context_windows(X, 2, 27)
    assert W.tolist() == [[[0, 27], [5, 0], [6, 5]], [[0, 27], [1, 0], [2, 1]]]
    assert ops.context_windows(X, 4, 9)[0, 2].tolist() == [6, 5, 0, 9]


def test_context_windows_match_makemores_roll():
    """makemore's MLP: embed idx, roll it one step right, put the blank first; block_size times."""
    X = torch.randint(0, 27, (3, 7), generator=torch.Generator().manual_seed(0))
    idx, columns = X.clone(), []
    for _ in range(4):
        columns.append(idx)
        idx = torch.roll(idx, 1, 1)
        idx[:, 0] = 27
    assert torch.equal(ops.context_windows(X, 4, 27), torch.stack(columns, -1))


@pytest.mark.parametrize("shape", [(3, 2), (2, 4, 3, 5)], ids=str)
def test_flatten_last_backward_matches_autograd_and_finite_differences(shape):
    assert_passed(check_backward(ops.flatten_last_forward, ops.flatten_last_backward, {"x": randn(0, *shape)}))
