"""Shape diagnoses that name what they see, the same in the autograd and the finite-difference rows;
the lecture check's closed-form rows not blamed for a mistake upstream of them; check_layer and
check_model on every built-in layer, the three models and a user's own layer."""

import dataclasses

import pytest
import torch

from handgrad import atomic, check, layers, models, ops


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def linear_inputs():
    return {"x": randn(6, 4, seed=1), "W": randn(4, 3, seed=2), "b": randn(3, seed=3)}


def with_linear_grads(change):
    """ops.linear_backward with one of its gradients changed by change(dx, dW, db, dout)."""
    def backward(dout, cache):
        return change(*ops.linear_backward(dout, cache), dout)
    return backward


def bn_forward(x, g, b):
    return ops.batchnorm_forward(x, g, b)[:2]


# ---------------------------------------------------------------------------- shape diagnoses
SHAPE_CASES = [  # (name, backward, inputs, tensor, words in both rows' diagnosis)
    ("not summed", with_linear_grads(lambda dx, dW, db, dout: (dx, dW, dout)), linear_inputs, "b",
     ["not summed over dim(s) [0]", "its sum over them equals the reference"]),
    ("transposed", with_linear_grads(lambda dx, dW, db, dout: (dx, dW.T.contiguous(), db)), linear_inputs,
     "W", ["transposed, manual.T matches the reference"]),
    ("view in the wrong order", with_linear_grads(lambda dx, dW, db, dout: (dx, dW.T.reshape(dW.shape), db)),
     linear_inputs, "W", ["a view in the wrong dimension order", "permute(1, 0)"]),
    ("missing keepdim", lambda dout, cache: (lambda dx, dg, db: (dx, dg.reshape(1, -1), db))(
        *ops.batchnorm_backward(dout, cache)),
     lambda: {"x": 2 * randn(8, 3, seed=4) + 1, "g": 1 + 0.3 * randn(3, seed=5), "b": randn(3, seed=6)},
     "g", ["keepdim=True forgotten", "the values agree"]),
]


@pytest.mark.parametrize("name, backward, make_inputs, tensor, words", SHAPE_CASES,
                         ids=[c[0] for c in SHAPE_CASES])
def test_shape_diagnoses_name_what_they_see_in_the_autograd_and_fd_rows_alike(
        name, backward, make_inputs, tensor, words):
    forward = bn_forward if tensor == "g" else ops.linear_forward
    inputs = make_inputs()
    report = check.check_backward(forward, backward, inputs)
    ag = report.row(tensor)
    fd = report.sections[-1].rows[list(inputs).index(tensor)]
    assert not ag.passed and not fd.passed
    for w in words:
        assert w in ag.diagnosis and w in fd.diagnosis, (ag.diagnosis, fd.diagnosis)
    assert ag.diagnosis.split(" [")[0] == fd.diagnosis.split(" [")[0]  # no contradiction between rows


def test_a_gradient_not_broadcast_back_through_a_reduction_is_named():
    def forward(x):
        return x.sum(0), None

    def backward(dout, cache):
        return dout  # (C,) where x is (N, C)
    report = check.check_backward(forward, backward, {"x": randn(5, 3)})
    for row in (report.row("x"), report.sections[-1].rows[0]):
        assert not row.passed and "not broadcast back" in row.diagnosis and "expanded over dim(s) [0]" in row.diagnosis


# ---------------------------------------------------------------------------- the lecture's graph
def test_closed_form_rows_are_not_blamed_for_a_mistake_upstream_of_them():
    def backward(p, X, Y, f):  # everything from dlogits down to dhpreact flipped
        g = atomic.backward(p, X, Y, f)
        return dataclasses.replace(g, dlogits=-g.dlogits, dh=-g.dh, dhpreact=-g.dhpreact)
    p, X, Y = check.lecture_batch(0, torch.float32)
    report = check.check_lecture_graph(p, X, Y, backward=backward)
    assert not report.passed and not report.row("logits").passed and not report.row("hpreact").passed
    for section in (1, 2):
        assert report.row("hprebn (ops.batchnorm_backward)", section).passed
        assert report.row("logits (ops.cross_entropy_backward)", section).passed


# ---------------------------------------------------------------------------- check_layer
def _init(layer, seed):
    g = torch.Generator().manual_seed(seed)
    layer.init_(g)
    for name, t in layer.params().items():  # non-trivial: gains away from 1, biases and start states from 0
        if name.endswith("bias") or isinstance(layer, layers.BatchNorm1d) or bool((t == t.flatten()[0]).all()):
            t.add_(0.5 * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype))
    return layer


def _x(shape, seed, dtype):
    return (2 * torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed),
                            dtype=torch.float64) + 0.5).to(dtype)


BUILTIN_CASES = [  # (id, make layer(dtype), x shape or an index tensor)
    ("Embedding", lambda d: layers.Embedding(7, 4, dtype=d), torch.tensor([[0, 1, 1], [2, 6, 1], [4, 4, 5]])),
    ("Linear", lambda d: layers.Linear(5, 3, dtype=d), (6, 5)),
    ("Linear no bias 3-D", lambda d: layers.Linear(5, 3, bias=False, dtype=d), (4, 2, 5)),
    ("BatchNorm1d batch 2", lambda d: layers.BatchNorm1d(4, dtype=d), (2, 4)),
    ("BatchNorm1d 3-D", lambda d: layers.BatchNorm1d(4, dtype=d), (8, 3, 4)),
    ("Tanh", lambda d: layers.Tanh(), (6, 5)),
    ("ReLU", lambda d: layers.ReLU(), (6, 5)),
    ("FlattenConsecutive", lambda d: layers.FlattenConsecutive(2), (3, 4, 5)),
    ("Sequential", lambda d: layers.Sequential([layers.Linear(5, 6, dtype=d), layers.BatchNorm1d(6, dtype=d),
                                                layers.Tanh(), layers.Linear(6, 3, dtype=d)]), (8, 5)),
    # makemore's zoo: sequences (B, T, E) and ids (B, T)
    ("Embedding (B, T) bigram", lambda d: layers.Embedding(6, 6, dtype=d), torch.tensor([[0, 3, 3, 5], [1, 0, 2, 2]])),
    ("Linear torch init (B, T, in)", lambda d: layers.Linear(5, 3, init="torch", dtype=d), (2, 4, 5)),
    ("PositionEmbedding short", lambda d: layers.PositionEmbedding(6, 4, dtype=d), (3, 4, 4)),
    ("LayerNorm", lambda d: layers.LayerNorm(5, dtype=d), (3, 4, 5)),
    ("GELU", lambda d: layers.GELU(), (3, 4, 5)),
    ("CausalSelfAttention", lambda d: layers.CausalSelfAttention(4, 2, 5, dtype=d), (2, 5, 4)),
    ("CausalSelfAttention recompute", lambda d: layers.CausalSelfAttention(4, 1, 5, recompute=True, dtype=d),
     (2, 3, 4)),
    ("Block", lambda d: layers.Block(4, 2, 4, dtype=d), (2, 4, 4)),
    ("CausalBoW", lambda d: layers.CausalBoW(5), (2, 5, 3)),
    ("BoWBlock", lambda d: layers.BoWBlock(4, 6, 5, dtype=d), (2, 5, 4)),
    ("Recurrent rnn", lambda d: layers.Recurrent("rnn", 3, 4, dtype=d), (2, 4, 3)),
    ("Recurrent gru", lambda d: layers.Recurrent("gru", 3, 4, dtype=d), (2, 4, 3)),
    ("ContextWindows alone", lambda d: layers.ContextWindows(3, 5), torch.tensor([[0, 1, 4, 2], [3, 3, 0, 1]])),
    ("Bengio MLP over a sequence", lambda d: layers.Sequential([
        layers.ContextWindows(3, 5), layers.Embedding(6, 2, dtype=d), layers.FlattenLast(),
        layers.Linear(6, 5, init="torch", dtype=d), layers.Tanh(), layers.Linear(5, 5, init="torch", dtype=d)]),
     torch.tensor([[0, 1, 4, 2], [3, 3, 0, 1]])),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", BUILTIN_CASES, ids=[c[0] for c in BUILTIN_CASES])
def test_check_layer_passes_every_builtin_layer(case, dtype):
    _, make, shape = case
    for seed in range(3):
        layer = _init(make(dtype), seed)
        x = shape if isinstance(shape, torch.Tensor) else _x(shape, seed, dtype)
        report = check.check_layer(layer, x, seed=seed)
        assert report.passed, str(report)
        fd_names = [r.name for r in report.sections[-1].rows]
        assert set(layer.params()) <= set(fd_names)  # every parameter differenced


class Scale:
    """A user's own layer: out = x * gain, one parameter, the library's protocol."""

    def __init__(self, dim, broken=False):
        self.gain = 1 + 0.5 * randn(dim, seed=7)
        self.broken = broken

    def params(self):
        return {"gain": self.gain}

    def buffers(self):
        return {}

    def forward(self, x, training=True):
        return x * self.gain, x

    def backward(self, dout, x):
        dgain = (dout * x).sum(0)
        return dout * self.gain, {"gain": 2 * dgain if self.broken else dgain}

    def spec(self):
        return {"type": "Scale", "dim": self.gain.shape[0]}


def test_check_layer_takes_a_users_own_layer_and_names_its_wrong_parameter():
    x = _x((6, 4), 0, torch.float64)
    assert check.check_layer(Scale(4), x).passed
    bad = check.check_layer(Scale(4, broken=True), x)
    assert not bad.passed and [r.name for r in bad.failures()] == ["gain", "gain"]
    assert "factor 2" in bad.row("gain").diagnosis


def test_check_model_takes_a_sequential_with_a_users_own_layer():
    model = layers.Sequential([layers.Embedding(27, 4, dtype=torch.float64), layers.Linear(4, 4, dtype=torch.float64),
                               Scale(4), layers.Linear(4, 27, dtype=torch.float64)])
    model.init_(torch.Generator().manual_seed(0))
    X = torch.randint(0, 27, (8,), generator=torch.Generator().manual_seed(1))
    Y = torch.randint(0, 27, (8,), generator=torch.Generator().manual_seed(2))
    assert check.check_model(model, X, Y).passed
    model.layers[2].broken = True
    report = check.check_model(model, X, Y)
    assert not report.passed and "2.gain" in [r.name for r in report.failures()]


SMALL = {"mlp": {"n_hidden": 16}, "deep": {"n_hidden": 12, "n_layers": 2}, "wavenet": {"block_size": 4,
                                                                                      "n_embd": 4, "n_hidden": 8}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(SMALL))
def test_check_model_passes_each_model(name, dtype):
    cfg = models.preset(name, **SMALL[name])
    model = models.build(cfg, 0, dtype)
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), generator=g)
    Y = torch.randint(0, cfg.vocab_size, (8,), generator=g)
    report = check.check_model(model, X, Y)
    assert report.passed, str(report)
    assert {r.name for r in report.sections[-1].rows} == set(model.params())


def test_check_model_flags_a_layer_with_a_wrong_backward():
    cfg = models.preset("deep", n_hidden=12, n_layers=2)
    model = models.build(cfg, 0, torch.float64)
    tanh = next(i for i, layer in enumerate(model.layers) if isinstance(layer, layers.Tanh))

    class HalfTanh(layers.Tanh):
        def backward(self, dout, cache):
            dx, g = super().backward(dout, cache)
            return 0.5 * dx, g
    model.layers[tanh] = HalfTanh()
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 27, (8, 3), generator=g)
    Y = torch.randint(0, 27, (8,), generator=g)
    report = check.check_model(model, X, Y)
    assert not report.passed
    wrong = {r.name for r in report.failures()}
    assert all(int(n.split(".")[0]) < tanh for n in wrong)  # only the layers before the broken one
