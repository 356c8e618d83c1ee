"""makemore's zoo as layers (layers.py): the architectures against PyTorch's own modules and makemore's
formulas, makemore's parameter counts, dotted parameter names through set_tensor and from_spec,
PyTorch's default initialisation, causality and padding (a position after the last counted one gets
zero gradient, and the gradients equal those of the shorter sequence), the activation memory of a
transformer block and its recompute option, and bad input refused in one line. The gradient checks
against autograd and finite differences of every layer are rows of tests/test_check_layers.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from handgrad import layers
from handgrad.layers import (
    GELU,
    Block,
    BoWBlock,
    CausalBoW,
    CausalSelfAttention,
    ContextWindows,
    Embedding,
    FlattenLast,
    LayerNorm,
    Linear,
    PositionEmbedding,
    Recurrent,
    Sequential,
    Tanh,
    activation_bytes,
    from_spec,
    set_tensor,
)

D = torch.float64


def randn(seed, *shape, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


def noisy(layer, seed=0):
    """Default init, then every tensor moved off it (LayerNorm gains off 1, start states off 0)."""
    g = torch.Generator().manual_seed(seed)
    layer.init_(g)
    for t in layer.params().values():
        t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=D).to(t.dtype))
    return layer


def grads(layer, x, dout):
    with torch.no_grad():
        _, cache = layer.forward(x)
        return layer.backward(dout, cache)


# ---------------------------------------------------------------------------- against torch / makemore
def torch_linear(lin, x):
    return F.linear(x, lin.weight.T, lin.bias)  # nn.Linear keeps weight as (out, in)


def makemore_attention(attn, x):
    """makemore's CausalSelfAttention.forward, in torch."""
    B, T, C = x.shape
    nh = attn.n_head
    q, k, v = torch_linear(attn.c_attn, x).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(-1)
    return torch_linear(attn.c_proj, (att @ v).transpose(1, 2).contiguous().view(B, T, C))


def test_block_is_makemores_transformer_block():
    block = noisy(Block(8, 2, 6, dtype=D))
    x = randn(1, 3, 5, 8)

    def ln(layer, t):
        return F.layer_norm(t, (8,), layer.weight, layer.bias, eps=1e-5)
    ref = x + makemore_attention(block.attn, ln(block.ln_1, x))
    m = block.mlp
    ref = ref + torch_linear(m.c_proj, F.gelu(torch_linear(m.c_fc, ln(block.ln_2, ref)), approximate="tanh"))
    assert torch.allclose(block.forward(x)[0], ref, atol=1e-12)


def test_bow_block_is_makemores():
    blk = noisy(BoWBlock(4, 6, 5, dtype=D))
    x = randn(1, 2, 5, 4)
    T = 5
    att = torch.zeros(T, T, dtype=D).masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(-1)
    ref = x + att @ x
    ref = ref + torch_linear(blk.mlp.c_proj, torch.tanh(torch_linear(blk.mlp.c_fc, ref)))
    assert torch.allclose(blk.forward(x)[0], ref, atol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_recurrent_is_makemores_cell_unrolled_from_its_start_state(cell):
    rec = noisy(Recurrent(cell, 3, 4, dtype=D))
    x = randn(1, 2, 5, 3)
    h = rec.start.expand(2, -1)
    hs = []
    for t in range(5):
        xh = torch.cat([x[:, t], h], 1)
        if cell == "rnn":
            h = torch.tanh(torch_linear(rec.xh_to_h, xh))
        else:
            r = torch.sigmoid(torch_linear(rec.xh_to_r, xh))
            hbar = torch.tanh(torch_linear(rec.xh_to_hbar, torch.cat([x[:, t], r * h], 1)))
            z = torch.sigmoid(torch_linear(rec.xh_to_z, xh))
            h = (1 - z) * h + z * hbar
        hs.append(h)
    assert torch.allclose(rec.forward(x)[0], torch.stack(hs, 1), atol=1e-12)


def test_layernorm_is_torchs():
    ln = noisy(LayerNorm(5, dtype=D))
    x = randn(2, 3, 4, 5, scale=3.0)
    ref = torch.nn.LayerNorm(5, dtype=D)
    ref.weight.data, ref.bias.data = ln.weight.clone(), ln.bias.clone()
    with torch.no_grad():
        assert torch.allclose(ln.forward(x)[0], ref(x), atol=1e-12)


def zoo(V=27, bs=16, E=64, H=64, n_layer=4, n_head=4):
    """The bodies of makemore.py's models with its defaults, as handgrad layers."""
    return {
        "bigram": Sequential([Embedding(V, V)]),
        "bow": Sequential([Embedding(V, E), PositionEmbedding(bs, E), BoWBlock(E, H, bs), Linear(E, V)]),
        "mlp": Sequential([ContextWindows(bs, V), Embedding(V + 1, E), FlattenLast(bs * E), Linear(bs * E, H), Tanh(),
                           Linear(H, V)]),
        "rnn": Sequential([Embedding(V, E), Recurrent("rnn", E, H), Linear(H, V)]),
        "gru": Sequential([Embedding(V, E), Recurrent("gru", E, H), Linear(H, V)]),
        "transformer": Sequential([Embedding(V, E), PositionEmbedding(bs, E),
                                   *[Block(E, n_head, bs) for _ in range(n_layer)], LayerNorm(E),
                                   Linear(E, V, bias=False)]),
    }


MAKEMORE_PARAMS = {"bigram": 729, "bow": 12_827, "mlp": 69_147, "rnn": 11_803, "gru": 28_315,
                   "transformer": 204_544}  # the table, from makemore.py's own runs


@pytest.mark.parametrize("name", list(MAKEMORE_PARAMS))
def test_each_model_has_makemores_parameter_count_and_gives_logits_per_position(name):
    model = zoo()[name]
    assert layers.numel(model) == MAKEMORE_PARAMS[name]
    model.init_(torch.Generator().manual_seed(0))
    X = torch.randint(0, 27, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, cache = model.forward(X)
    assert logits.shape == (2, 16, 27)
    dx, g = model.backward(randn(2, 2, 16, 27).float(), cache)
    assert dx is None and set(g) == set(model.params())


def test_each_model_runs_on_the_meta_device_as_a_checkpoint_load_does():
    """checkpoint.py rebuilds a spec on the meta device and runs a forward to check its sizes."""
    for name, model in zoo().items():
        with torch.device("meta"):
            out = from_spec(model.spec()).forward(torch.zeros((2, 16), dtype=torch.long))[0]
        assert out.shape == (2, 16, 27) and out.device.type == "meta", name


# ---------------------------------------------------------------------------- names, specs, init
def test_dotted_names_reach_the_tensors_and_specs_rebuild_them():
    model = noisy(Sequential([PositionEmbedding(6, 4, dtype=D), Block(4, 2, 6, dtype=D), LayerNorm(4, dtype=D),
                              Recurrent("gru", 4, 3, dtype=D), BoWBlock(3, 5, 6, dtype=D)]))
    names = list(model.params())
    assert {"1.ln_1.weight", "1.attn.c_attn.weight", "1.attn.c_proj.bias", "1.mlp.c_fc.weight", "3.start",
            "3.xh_to_hbar.weight", "4.mlp.c_proj.bias"} <= set(names)
    again = from_spec(model.spec(), D)
    assert again.spec() == model.spec() and list(again.params()) == names
    for k, t in model.params().items():  # a checkpoint's load: every tensor by its name
        set_tensor(again, k, t.clone())
    x = randn(3, 2, 5, 4)
    assert torch.equal(again.forward(x)[0], model.forward(x)[0])
    set_tensor(again, "1.attn.c_attn.weight", torch.zeros(4, 12, dtype=D))
    assert again.layers[1].attn.c_attn.weight.abs().sum() == 0


@pytest.mark.parametrize("spec", [
    {"type": "Recurrent", "cell": "lstm", "n_embd": 4, "n_embd2": 4},
    {"type": "CausalSelfAttention", "n_embd": 6, "n_head": 4, "block_size": 8},
    {"type": "Linear", "fan_in": 3, "fan_out": 2, "init": "xavier"},
    {"type": "Block", "n_embd": "64", "n_head": 4, "block_size": 8},
], ids=["cell", "n_head", "init", "a size as a string"])
def test_a_bad_zoo_spec_is_refused_in_one_line(spec):
    with pytest.raises(layers.SpecError) as e:
        from_spec(spec)
    assert "\n" not in str(e.value) and spec["type"] in str(e.value)


def test_init_follows_pytorchs_defaults_and_is_seeded():
    block = Block(16, 4, 8)
    block.init_(torch.Generator().manual_seed(0))
    k = 1 / math.sqrt(16)
    for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc):
        assert lin.weight.abs().max() <= k and lin.weight.std() > 0.5 * k / math.sqrt(3)
        assert lin.bias.abs().max() <= k and lin.bias.abs().sum() > 0  # nn.Linear draws its bias too
    assert block.mlp.c_proj.weight.abs().max() <= 1 / math.sqrt(64)  # fan_in 4E
    assert (block.ln_1.weight == 1).all() and (block.ln_1.bias == 0).all()
    rec = Recurrent("gru", 4, 5)
    rec.init_(torch.Generator().manual_seed(0))
    assert (rec.start == 0).all() and rec.xh_to_z.weight.abs().max() <= 1 / 3  # fan_in E + H = 9
    wpe = PositionEmbedding(64, 32)
    wpe.init_(torch.Generator().manual_seed(0))
    assert abs(wpe.weight.std().item() - 1) < 0.05  # nn.Embedding: N(0, 1)
    again = Block(16, 4, 8)
    again.init_(torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(block.params().values(), again.params().values()))
    lecture = Linear(16, 4)
    lecture.init_(torch.Generator().manual_seed(0))
    assert (lecture.bias == 0).all() and "init" not in lecture.spec()  # the lecture's rule is unchanged


# ---------------------------------------------------------------------------- causality and padding
SEQUENCE_LAYERS = [
    ("CausalSelfAttention", lambda: CausalSelfAttention(4, 2, 6, dtype=D)),
    ("Block", lambda: Block(4, 2, 6, dtype=D)),
    ("BoWBlock", lambda: BoWBlock(4, 5, 6, dtype=D)),
    ("Recurrent rnn", lambda: Recurrent("rnn", 4, 4, dtype=D)),
    ("Recurrent gru", lambda: Recurrent("gru", 4, 4, dtype=D)),
]


@pytest.mark.parametrize("make", [m for _, m in SEQUENCE_LAYERS], ids=[n for n, _ in SEQUENCE_LAYERS])
@pytest.mark.parametrize("p", [1, 3, 5])
def test_positions_after_the_last_counted_one_get_zero_gradient_and_change_nothing(make, p):
    """Padding: dout is 0 from position p on (the loss ignores those targets). Then dx there is exactly
    0, and every gradient equals that of the sequence cut at p: the padding changes nothing."""
    layer = noisy(make())
    x = randn(1, 2, 6, 4)
    dout = randn(2, 2, 6, layer.forward(x)[0].shape[-1])
    dout[:, p:] = 0
    dx, g = grads(layer, x, dout)
    assert (dx[:, p:] == 0).all() and (dx[:, :p] != 0).any()
    dx_cut, g_cut = grads(layer, x[:, :p].contiguous(), dout[:, :p].contiguous())
    assert torch.allclose(dx[:, :p], dx_cut, atol=1e-12)
    for k in g:
        assert torch.allclose(g[k], g_cut[k], atol=1e-12), k


@pytest.mark.parametrize("make", [m for _, m in SEQUENCE_LAYERS], ids=[n for n, _ in SEQUENCE_LAYERS])
def test_the_future_never_changes_the_past(make):
    layer = noisy(make())
    x = randn(1, 2, 6, 4)
    later = x.clone()
    later[:, 4:] += randn(5, 2, 2, 4)
    out, out_later = layer.forward(x)[0], layer.forward(later)[0]
    assert torch.equal(out[:, :4], out_later[:, :4]) and not torch.equal(out[:, 4:], out_later[:, 4:])


def test_the_bigram_and_the_mlp_see_only_the_past():
    V = 5
    mlp = noisy(Sequential([ContextWindows(3, V), Embedding(V + 1, 2, dtype=D), FlattenLast(),
                            Linear(6, 4, init="torch", dtype=D), Tanh(), Linear(4, V, init="torch", dtype=D)]))
    X = torch.tensor([[0, 1, 2, 3, 4, 1]])
    later = X.clone()
    later[0, 4:] = torch.tensor([0, 0])
    assert torch.equal(mlp.forward(X)[0][:, :4], mlp.forward(later)[0][:, :4])
    dx, g = grads(mlp, X, randn(0, 1, 6, V))
    assert dx is None and set(g) == set(mlp.params())
    assert g["1.weight"][V].abs().sum() > 0  # the blank's row learns (positions 0 and 1 see it)


# ---------------------------------------------------------------------------- memory and recompute
@pytest.mark.parametrize("B, T, E, nh", [(1, 1, 4, 1), (2, 5, 8, 2), (3, 16, 16, 4)])
@pytest.mark.parametrize("recompute", [False, True], ids=["att cached", "att recomputed"])
def test_block_activation_bytes_is_what_its_cache_holds(B, T, E, nh, recompute):
    block = Block(E, nh, max(T, 2), recompute=recompute)
    block.init_(torch.Generator().manual_seed(0))
    x = torch.randn(B, T, E)
    assert block.activation_bytes(B, T) == activation_bytes(block, x)
    cached = Block(E, nh, max(T, 2))
    assert cached.activation_bytes(B, T) - block.activation_bytes(B, T) == (nh * B * T * T * 4 if recompute else 0)


def test_recomputing_the_attention_matrix_gives_the_same_gradients():
    cached = noisy(Block(8, 2, 8, dtype=D))
    recomputed = Block(8, 2, 8, recompute=True, dtype=D)
    for k, t in cached.params().items():
        set_tensor(recomputed, k, t.clone())
    x, dout = randn(0, 2, 7, 8), randn(1, 2, 7, 8)
    dx, g = grads(cached, x, dout)
    dx_r, g_r = grads(recomputed, x, dout)
    assert torch.equal(dx, dx_r) and all(torch.equal(g[k], g_r[k]) for k in g)
    assert recomputed.spec()["recompute"] is True and "recompute" not in cached.spec()


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, x, words", [
    (lambda: CausalSelfAttention(64, 3, 8), None, "n_head 3 does not divide n_embd 64"),
    (lambda: Block(10, 4, 8), None, "n_head 4 does not divide n_embd 10"),
    (lambda: Block(8, 0, 8), None, "n_head must be at least 1, got 0"),
    (lambda: Block(4, 2, 3), torch.zeros(2, 5, 4), "5 positions is longer than the block size 3"),
    (lambda: PositionEmbedding(3, 4), torch.zeros(2, 5, 4), "longer than the block size 3"),
    (lambda: CausalBoW(3), torch.zeros(1, 4, 2), "longer than the block size 3"),
    (lambda: Block(4, 2, 8), torch.zeros(2, 5, 6), "Block needs a float (B, T, 4) input with T >= 1"),
    (lambda: LayerNorm(4), torch.zeros(2, 5, 6), "LayerNorm(4) normalises a last dimension of 4"),
    (lambda: Recurrent("gru", 4, 3), torch.zeros(2, 4), "needs a float (B, T, 4) input"),
    (lambda: Recurrent("lstm", 4, 3), None, "cell must be one of rnn, gru"),
    (lambda: ContextWindows(3, 27), torch.zeros(2, 4), "needs integer ids (B, T)"),
    (lambda: FlattenLast(), torch.zeros(3), "at least 2 dimensions"),
    (lambda: FlattenLast(12), torch.zeros(2, 4, 2), "k*E = 12, got shape (2, 4, 2)"),
    (lambda: Recurrent("rnn", 4, 3), torch.zeros(2, 0, 4), "with T >= 1"),
], ids=["attention n_head", "block n_head", "no heads", "block too long", "positions too long", "bow too long",
        "wrong width", "layernorm width", "recurrent 2-D", "cell", "windows of floats", "flatten 1-D", "flatten size",
        "empty sequence"])
def test_bad_input_is_refused_in_one_line_naming_the_sizes(make, x, words):
    with pytest.raises(ValueError) as e:
        make().forward(x)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_check_layer_on_an_index_layer_checks_its_contract_only():
    from handgrad.check import check_layer

    class Leaky(ContextWindows):
        def backward(self, dout, cache):
            return torch.zeros(1), {}
    X = torch.tensor([[0, 1, 2]])
    assert check_layer(ContextWindows(3, 5), X).passed
    bad = check_layer(Leaky(3, 5), X)
    assert not bad.passed and "must return (None, {})" in bad.row("output").diagnosis


def test_index_layers_must_lead_the_sequential():
    model = Sequential([Linear(2, 2), ContextWindows(2, 3), Embedding(4, 2)])
    with pytest.raises(ValueError, match="only the first layer may take indices"):
        model.backward(torch.zeros(1, 2, 2, 2), [None, None, (torch.zeros(1, 2, 2, dtype=torch.long), 4)])


def test_gelu_layer_has_no_parameters_and_specs():
    assert GELU().params() == {} and from_spec(GELU().spec()).spec() == {"type": "GELU"}


# ---------------------------------------------------------------------------- check_layer on more shapes
EDGE_CASES = [  # (id, layer, x shape): the edges of each sequence layer's shapes
    ("Block one position", lambda: Block(4, 1, 4, dtype=D), (3, 1, 4)),
    ("CausalSelfAttention heads of one channel", lambda: CausalSelfAttention(4, 4, 3, dtype=D), (1, 3, 4)),
    ("BoWBlock one sequence", lambda: BoWBlock(3, 2, 6, dtype=D), (1, 6, 3)),
    ("Recurrent gru one position", lambda: Recurrent("gru", 2, 3, dtype=D), (4, 1, 2)),
    ("Recurrent rnn long", lambda: Recurrent("rnn", 2, 2, dtype=D), (2, 9, 2)),
    ("PositionEmbedding full block", lambda: PositionEmbedding(3, 2, dtype=D), (2, 3, 2)),
]


@pytest.mark.parametrize("make, shape", [c[1:] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
def test_check_layer_passes_the_sequence_layers_at_the_edges_of_their_shapes(make, shape):
    from handgrad.check import check_layer
    layer = noisy(make(), seed=5)
    report = check_layer(layer, randn(6, *shape, scale=1.5), seed=5)
    assert report.passed, str(report)


def test_check_layer_names_the_wrong_parameter_inside_a_composite():
    from handgrad.check import check_layer

    class HalfGain(LayerNorm):
        def backward(self, dout, cache):
            dx, g = super().backward(dout, cache)
            return dx, {**g, "weight": 0.5 * g["weight"]}
    block = noisy(Block(4, 2, 4, dtype=D))
    block.ln_2 = noisy(HalfGain(4, dtype=D), seed=1)
    report = check_layer(block, randn(7, 2, 4, 4), name_mistakes=False)
    assert not report.passed and {r.name for r in report.failures()} == {"ln_2.weight"}
