import pytest
import torch

from handgrad import model, ops
from handgrad.model import ModelConfig
from handgrad.reference import autograd_grads


def test_default_model_has_the_lectures_12297_parameters():
    assert model.init_params(ModelConfig()).numel() == 12_297


def test_init_is_seeded_and_non_trivial():
    a, b = model.init_params(ModelConfig(), 1), model.init_params(ModelConfig(), 1)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert all(t.abs().min() > 0 or t.numel() == 1 for t in (a.b1, a.W2, a.b2, a.bnbias))
    assert (a.bngain - 1).abs().max() < 0.6 and a.bnbias.abs().max() < 0.6


@pytest.mark.parametrize("batchnorm", [True, False])
@pytest.mark.parametrize("N, T, E, H, V, seed", [(32, 3, 10, 64, 27, 0), (7, 2, 3, 5, 4, 1), (50, 4, 6, 33, 11, 2)])
def test_model_backward_matches_autograd_in_float64(N, T, E, H, V, seed, batchnorm):
    cfg = ModelConfig(vocab_size=V, block_size=T, n_embd=E, n_hidden=H)
    p = model.init_params(cfg, seed, torch.float64)
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (N, T), generator=g)
    X[1] = X[0]  # repeated rows: dC must accumulate
    Y = torch.randint(0, V, (N,), generator=g)
    loss, acts = model.forward(p, X, Y, batchnorm)
    grads = model.backward(p, acts)
    ref_loss, ref, _ = autograd_grads(p, X, Y, batchnorm)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-14)
    for (name, mine), theirs in zip(grads.items(), ref.tensors()):
        assert mine.shape == theirs.shape, name
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-13, msg=name)


def test_embedding_backward_accumulates_repeated_rows_by_hand():
    X = torch.tensor([[1, 1], [0, 1]])
    demb = torch.arange(8, dtype=torch.float64).reshape(2, 2, 2)  # (N, T, E)
    dC = ops.embedding_backward(demb, (X, 3))
    # row 1 is used at (0,0), (0,1), (1,1): [0,1]+[2,3]+[6,7]; row 0 at (1,0): [4,5]
    assert dC.tolist() == [[4, 5], [8, 11], [0, 0]]


def test_calibrated_stats_are_the_full_batch_mean_and_bessel_variance():
    cfg = ModelConfig(n_hidden=16)
    p = model.init_params(cfg, 3, torch.float64)
    X = torch.randint(0, 27, (1000, 3), generator=torch.Generator().manual_seed(0))
    bn = model.calibrate_bn(p, X, chunk=300)
    hpre = model.hidden_preact(p, X)
    torch.testing.assert_close(bn.mean, hpre.mean(0, keepdim=True))
    torch.testing.assert_close(bn.var, hpre.var(0, keepdim=True, unbiased=True))


def test_inference_with_batch_statistics_equals_training_forward():
    cfg = ModelConfig(n_hidden=20)
    p = model.init_params(cfg, 4, torch.float64)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randint(0, 27, (64, 3), generator=g), torch.randint(0, 27, (64,), generator=g)
    loss, _ = model.forward(p, X, Y)
    bn = model.calibrate_bn(p, X)
    assert model.evaluate(p, bn, X, Y) == pytest.approx(loss.item(), rel=1e-12)


def test_sampling_is_seeded_and_ends_with_the_end_token():
    cfg = ModelConfig()
    p = model.init_params(cfg, 0)
    bn = model.init_bn_stats(cfg)
    a = model.sample(p, bn, 3, n=5, seed=9)
    assert a == model.sample(p, bn, 3, n=5, seed=9)
    assert all(0 not in s and all(0 < i < 27 for i in s) for s in a)
