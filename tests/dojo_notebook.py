"""A learner's finished notebook for the exercises of Karpathy's lecture "Building makemore Part 4:
Becoming a Backprop Ninja", as data the dojo must grade. The cells are our own (setup, forward pass,
a comparison helper, exercises 1-4): the lecture's facts (its intermediate names, the order of its
forward ops, its sizes, the generator seed 2147483647 and its draw order, the 80/10/10 split after
random.seed(42), the maths of each gradient) in a learner's own code. They run one by one into a
namespace that keeps their sources the way IPython does (In / _ih, magics transformed); tests edit the
solution lines to type in a learner's mistake.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from handgrad.data import default_data_path

SETUP = [
    "import torch\nfrom torch.nn import functional as F\nimport matplotlib.pyplot as plt\n%matplotlib inline\n"
    "import random",
    f"names_file = {str(default_data_path())!r}\nwith open(names_file) as f:\n    words = f.read().split()\n"
    "print(len(words), 'names, the first few:', words[:5])",
    "# index 0 is '.', which pads a name's start and marks its end; the letters follow, a to z\n"
    "letters = sorted(set(''.join(words)))\nstoi = {'.': 0}\n"
    "stoi.update({ch: i + 1 for i, ch in enumerate(letters)})\nitos = {i: ch for ch, i in stoi.items()}\n"
    "vocab_size = len(stoi)",
    """block_size = 3  # how many previous characters the model sees

def examples(names):
    \"\"\"Every (context, next character) pair of the names; a context starts padded with '.' (index 0).\"\"\"
    xs, ys = [], []
    for name in names:
        ids = [stoi[ch] for ch in name] + [0]
        padded = [0] * block_size + ids
        xs += [padded[i:i + block_size] for i in range(len(ids))]
        ys += ids
    return torch.tensor(xs), torch.tensor(ys)

random.seed(42)
random.shuffle(words)
cut_train, cut_dev = int(0.8 * len(words)), int(0.9 * len(words))
Xtr, Ytr = examples(words[:cut_train])           # train, 80%
Xdev, Ydev = examples(words[cut_train:cut_dev])  # dev, 10%
Xte, Yte = examples(words[cut_dev:])             # test, 10%
print(Xtr.shape, Xdev.shape, Xte.shape)""",
    """def check(mine, t, label):
    \"\"\"Print how my gradient for t compares with the one autograd left in t.grad.\"\"\"
    gap = (mine - t.grad).abs().max().item()
    if gap == 0:
        verdict = 'exact'
    elif torch.allclose(mine, t.grad):
        verdict = 'close'
    else:
        verdict = 'WRONG'
    note = '' if mine.shape == t.shape else f'   shape {tuple(mine.shape)}, t is {tuple(t.shape)}'
    print(f'{label:<16}{verdict:<7}max gap {gap:.2e}{note}')""",
    """n_embd, n_hidden = 10, 64
fan_in = block_size * n_embd

g = torch.Generator().manual_seed(2147483647)
C = torch.randn((vocab_size, n_embd), generator=g)
W1 = torch.randn((fan_in, n_hidden), generator=g) * (5/3) / fan_in**0.5  # tanh's gain over sqrt(fan_in)
b1 = torch.randn(n_hidden, generator=g) * 0.1  # not needed before batchnorm; kept to check its gradient
W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.1
b2 = torch.randn(vocab_size, generator=g) * 0.1
# batchnorm's gain and bias: not 1 and 0, so that a gradient that forgets them shows
bngain = 1.0 + 0.1 * torch.randn((1, n_hidden))
bnbias = 0.1 * torch.randn((1, n_hidden))

parameters = [C, W1, b1, W2, b2, bngain, bnbias]
for p in parameters:
    p.requires_grad_()
print(sum(p.numel() for p in parameters), 'parameters')""",
    "n = batch_size = 32\npicks = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)\n"
    "Xb, Yb = Xtr[picks], Ytr[picks]  # (32, 3), (32,)",
]

FORWARD = """# the forward pass in small steps, each one simple enough to differentiate by hand
emb = C[Xb]                          # (32, 3, 10)
embcat = emb.view(n, -1)             # (32, 30)
hprebn = embcat @ W1 + b1            # (32, 64)

# batchnorm, written out
bnmeani = 1/n * hprebn.sum(0, keepdim=True)            # (1, 64)
bndiff = hprebn - bnmeani                              # (32, 64)
bndiff2 = bndiff**2                                    # (32, 64)
bnvar = 1/(n-1) * bndiff2.sum(0, keepdim=True)         # (1, 64), the unbiased variance
bnvar_inv = (bnvar + 1e-5)**-0.5                       # (1, 64)
bnraw = bndiff * bnvar_inv                             # (32, 64)
hpreact = bngain * bnraw + bnbias                      # (32, 64)

h = torch.tanh(hpreact)              # (32, 64)
logits = h @ W2 + b2                 # (32, 27)

# cross-entropy by hand
logit_maxes = logits.max(1, keepdim=True).values       # (32, 1)
norm_logits = logits - logit_maxes                     # (32, 27), exp cannot overflow
counts = norm_logits.exp()                             # (32, 27)
counts_sum = counts.sum(1, keepdim=True)               # (32, 1)
counts_sum_inv = counts_sum**-1                        # (32, 1)
probs = counts * counts_sum_inv                        # (32, 27)
logprobs = probs.log()                                 # (32, 27)
loss = -logprobs[range(n), Yb].mean()

# autograd's gradients too, every intermediate kept, to check mine against
for p in parameters:
    p.grad = None
for t in (emb, embcat, hprebn, bnmeani, bndiff, bndiff2, bnvar, bnvar_inv, bnraw, hpreact, h,
          logits, logit_maxes, norm_logits, counts, counts_sum, counts_sum_inv, probs, logprobs):
    t.retain_grad()
loss.backward()
print('loss', loss.item())"""

NAMES = [
    "logprobs",
    "probs",
    "counts_sum_inv",
    "counts_sum",
    "counts",
    "norm_logits",
    "logit_maxes",
    "logits",
    "h",
    "W2",
    "b2",
    "hpreact",
    "bngain",
    "bnbias",
    "bnraw",
    "bnvar_inv",
    "bnvar",
    "bndiff2",
    "bndiff",
    "bnmeani",
    "hprebn",
    "embcat",
    "W1",
    "b1",
    "emb",
    "C",
]

# Exercise 1 as a finished notebook holds it: the 26 gradients, then a check of each. Its dbnmeani keeps
# the lecture's `(-dbndiff).sum(0)`, a (64,) tensor for a (1, 64) one: right, with a shape note.
EX1_LINES = """# exercise 1: back through every intermediate, from the loss to C
# the loss is minus the mean of the n log-probabilities picked by Yb
dlogprobs = torch.zeros_like(logprobs)
dlogprobs[range(n), Yb] = -1/n
dprobs = dlogprobs / probs  # d log(p) / dp = 1/p
# probs = counts * counts_sum_inv, counts_sum_inv (32, 1) stretched along each row
dcounts_sum_inv = (dprobs * counts).sum(1, keepdim=True)
dcounts = dprobs * counts_sum_inv  # the first of counts' two uses
dcounts_sum = -counts_sum**-2 * dcounts_sum_inv
# the second use: each count is one term of its row's counts_sum
dcounts += dcounts_sum
dnorm_logits = dcounts * counts  # exp is its own derivative
dlogits = dnorm_logits.clone()
dlogit_maxes = -dnorm_logits.sum(1, keepdim=True)
# logit_maxes reads one logit per row, the largest
dlogits += F.one_hot(logits.argmax(1), logits.shape[1]) * dlogit_maxes
# second linear layer
dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
dhpreact = (1 - h**2) * dh  # tanh' = 1 - tanh**2
# batchnorm, step by step backwards
dbnbias = dhpreact.sum(0, keepdim=True)
dbngain = (dhpreact * bnraw).sum(0, keepdim=True)
dbnraw = dhpreact * bngain
dbndiff = dbnraw * bnvar_inv  # bndiff feeds bnraw here and bndiff2 below
dbnvar_inv = (dbnraw * bndiff).sum(0, keepdim=True)
dbnvar = -0.5 * (bnvar + 1e-5)**-1.5 * dbnvar_inv
dbndiff2 = 1/(n-1) * dbnvar.expand_as(bndiff2)  # the variance divides by n-1
dbndiff += 2 * bndiff * dbndiff2
dhprebn = dbndiff.clone()  # hprebn feeds bndiff directly and through the mean
dbnmeani = (-dbndiff).sum(0)
dhprebn += dbnmeani / n  # every row has a 1/n share in the mean
# first linear layer and the embedding table
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
demb = dembcat.view_as(emb)
dC = torch.zeros_like(C)
for row, context in enumerate(Xb):
    for pos, ch in enumerate(context):
        dC[ch] += demb[row, pos]"""

EX1 = EX1_LINES + "\n\n" + "\n".join(f"check(d{t}, {t}, '{t}')" for t in NAMES)

EX2_FORWARD = (
    "loss_fast = F.cross_entropy(logits, Yb)\n"
    "print('F.cross_entropy:', loss_fast.item(), 'mine:', loss.item(), 'gap:', (loss_fast - loss).item())"
)
EX2 = """# exercise 2: cross-entropy's backward at once: softmax minus the one-hot target, over n
dlogits = F.softmax(logits, 1)
dlogits[range(n), Yb] -= 1
dlogits /= n

check(dlogits, logits, 'logits')"""
EX3_FORWARD = (
    "mu = hprebn.mean(0, keepdim=True)\nvar = hprebn.var(0, keepdim=True)  # unbiased, as bnvar\n"
    "hpreact_fast = bngain * (hprebn - mu) / (var + 1e-5).sqrt() + bnbias\n"
    "print('largest gap to hpreact:', (hpreact_fast - hpreact).abs().max().item())"
)
EX3 = """# exercise 3: batchnorm's backward at once, from dhpreact to dhprebn
# with xhat = bnraw and s = bnvar_inv:
#   dx = gain * s / n * (n * dy - sum(dy) - n/(n-1) * xhat * sum(dy * xhat))
dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - n/(n-1) * bnraw * (dhpreact * bnraw).sum(0))

check(dhprebn, hprebn, 'hprebn')"""

# Exercise 4's cell: training with the backward pass by hand, stopped after `STEPS` steps as a learner does
# while checking it (the lecture's init with n_hidden 200, its learning rates, its batches).
EX4 = """# exercise 4: training with my own backward pass, no autograd
n_embd, n_hidden = 10, 200
fan_in = block_size * n_embd

g = torch.Generator().manual_seed(2147483647)
C = torch.randn((vocab_size, n_embd), generator=g)
W1 = torch.randn((fan_in, n_hidden), generator=g) * (5/3) / fan_in**0.5
b1 = torch.randn(n_hidden, generator=g) * 0.1
W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.1
b2 = torch.randn(vocab_size, generator=g) * 0.1
bngain = 1.0 + 0.1 * torch.randn((1, n_hidden))
bnbias = 0.1 * torch.randn((1, n_hidden))
parameters = [C, W1, b1, W2, b2, bngain, bnbias]

max_steps = 200_000
n = batch_size = 32
losses = []

with torch.no_grad():
    for i in range(max_steps):
        picks = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
        Xb, Yb = Xtr[picks], Ytr[picks]

        # forward, batchnorm with torch's own mean and (unbiased) var
        emb = C[Xb]
        embcat = emb.view(n, -1)
        hprebn = embcat @ W1 + b1
        bnmean = hprebn.mean(0, keepdim=True)
        bnvar = hprebn.var(0, keepdim=True)
        bnvar_inv = (bnvar + 1e-5)**-0.5
        bnraw = (hprebn - bnmean) * bnvar_inv
        hpreact = bngain * bnraw + bnbias
        h = torch.tanh(hpreact)
        logits = h @ W2 + b2
        loss = F.cross_entropy(logits, Yb)

        # backward, by hand (exercises 2 and 3 for the loss and batchnorm)
        dlogits = F.softmax(logits, 1)
        dlogits[range(n), Yb] -= 1
        dlogits /= n
        dh = dlogits @ W2.T
        dW2 = h.T @ dlogits
        db2 = dlogits.sum(0)
        dhpreact = (1 - h**2) * dh
        dbngain = (dhpreact * bnraw).sum(0, keepdim=True)
        dbnbias = dhpreact.sum(0, keepdim=True)
        dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - n/(n-1) * bnraw * (dhpreact * bnraw).sum(0))
        dembcat = dhprebn @ W1.T
        dW1 = embcat.T @ dhprebn
        db1 = dhprebn.sum(0)
        demb = dembcat.view_as(emb)
        dC = torch.zeros_like(C)
        dC.index_add_(0, Xb.flatten(), demb.view(-1, n_embd))

        # plain SGD, the step size cut tenfold halfway
        lr = 0.1 if i < max_steps // 2 else 0.01
        for p, grad in zip(parameters, [dC, dW1, db1, dW2, db2, dbngain, dbnbias]):
            p -= lr * grad

        losses.append(loss.item())
        if i % 10_000 == 0:
            print(i, round(loss.item(), 4))
        if i == STEPS:
            break"""


def line_of(cell: str, text: str) -> int:
    """The 1-based number of the cell's first line that contains `text`."""
    return next(i for i, line in enumerate(cell.splitlines(), 1) if text in line)


def transform(src: str) -> str:
    """What IPython keeps in In / _ih for a cell: line magics become get_ipython() calls."""
    return re.sub(
        r"^(\s*)%(\w+)\s*(.*)$",
        lambda m: f"{m.group(1)}get_ipython().run_line_magic({m.group(2)!r}, {m.group(3)!r})",
        src,
        flags=re.M,
    )


class _Shell:
    def run_line_magic(self, *args):
        return None


def run(ns: dict, src: str) -> dict:
    """Run one cell as IPython would: its (transformed) source appended to In / _ih, then executed."""
    code = transform(src)
    ns.setdefault("_ih", [""])
    ns["In"] = ns["_ih"]
    ns["_ih"].append(code)
    ns["get_ipython"] = lambda: _Shell()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            exec(compile(code, f"<In [{len(ns['_ih']) - 1}]>", "exec"), ns)  # noqa: S102  the notebook's cells
        except Exception as e:  # as IPython: the cell stops at its error, the notebook goes on
            ns.setdefault("_errors", []).append(f"In [{len(ns['_ih']) - 1}]: {type(e).__name__}: {e}")
    return ns


def setup_namespace() -> dict:
    ns: dict = {"__name__": "__main__"}
    for c in SETUP:
        run(ns, c)
    return ns


def fork(base: dict) -> dict:
    """A notebook that has run the setup cells (shared, read only), ready for the cells after them."""
    ns = dict(base)
    ns["_ih"] = list(base["_ih"])
    ns["In"] = ns["_ih"]
    return ns


def edit(cell: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        assert old in cell, old
        cell = cell.replace(old, new)
    return cell


def write_ipynb(path: Path, cells: list[str]) -> Path:
    """The cells as a real .ipynb file (nbformat 4)."""
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "metadata": {},
                "outputs": [],
                "source": c.splitlines(keepends=True),
            }
            for c in cells
        ],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 4,
    }
    path.write_text(json.dumps(nb, indent=1))
    return path


def run_ipynb(path: Path) -> dict:
    """A .ipynb file executed without a kernel: its code cells, in order, as IPython runs them."""
    nb = json.loads(Path(path).read_text())
    ns: dict = {"__name__": "__main__"}
    for c in nb["cells"]:
        if c.get("cell_type") == "code":
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            run(ns, src)
    return ns
