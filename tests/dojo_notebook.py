"""A learner's completed notebook of the lecture (Karpathy, "Building makemore Part 4: Becoming a Backprop
Ninja", nn-zero-to-hero, MIT), as data the dojo must grade: the cells in the lecture's order, run one by
one into a namespace that keeps their sources the way IPython does (In / _ih, magics transformed). The
exercise cells are the lecture's solution lines, which a finished notebook holds; tests edit them to type
in a learner's mistake.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from handgrad.data import default_data_path

SETUP = [
    "import torch\nimport torch.nn.functional as F\nimport matplotlib.pyplot as plt # for making figures\n"
    "%matplotlib inline",
    f"words = open({str(default_data_path())!r}, 'r').read().splitlines()\nprint(len(words))",
    "chars = sorted(list(set(''.join(words))))\nstoi = {s:i+1 for i,s in enumerate(chars)}\nstoi['.'] = 0\n"
    "itos = {i:s for s,i in stoi.items()}\nvocab_size = len(itos)",
    "block_size = 3\n\ndef build_dataset(words):\n  X, Y = [], []\n  for w in words:\n    context = [0] * block_size\n"
    "    for ch in w + '.':\n      ix = stoi[ch]\n      X.append(context)\n      Y.append(ix)\n"
    "      context = context[1:] + [ix]\n  X = torch.tensor(X)\n  Y = torch.tensor(Y)\n  return X, Y\n\n"
    "import random\nrandom.seed(42)\nrandom.shuffle(words)\nn1 = int(0.8*len(words))\nn2 = int(0.9*len(words))\n"
    "Xtr,  Ytr  = build_dataset(words[:n1])\nXdev, Ydev = build_dataset(words[n1:n2])\nXte,  Yte  = build_dataset(words[n2:])",
    "def cmp(s, dt, t):\n  ex = torch.all(dt == t.grad).item()\n  app = torch.allclose(dt, t.grad)\n"
    "  maxdiff = (dt - t.grad).abs().max().item()\n  shape_ok = dt.shape == t.shape\n"
    "  print(f'{s:15s} | exact: {str(ex):5s} | approximate: {str(app):5s} | maxdiff: {maxdiff}')",
    "n_embd = 10\nn_hidden = 64\n\ng = torch.Generator().manual_seed(2147483647)\n"
    "C  = torch.randn((vocab_size, n_embd),            generator=g)\n"
    "W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * (5/3)/((n_embd * block_size)**0.5)\n"
    "b1 = torch.randn(n_hidden,                        generator=g) * 0.1\n"
    "W2 = torch.randn((n_hidden, vocab_size),          generator=g) * 0.1\n"
    "b2 = torch.randn(vocab_size,                      generator=g) * 0.1\n"
    "bngain = torch.randn((1, n_hidden))*0.1 + 1.0\nbnbias = torch.randn((1, n_hidden))*0.1\n"
    "parameters = [C, W1, b1, W2, b2, bngain, bnbias]\nfor p in parameters:\n  p.requires_grad = True",
    "batch_size = 32\nn = batch_size\nix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)\n"
    "Xb, Yb = Xtr[ix], Ytr[ix]",
]

FORWARD = """emb = C[Xb]
embcat = emb.view(emb.shape[0], -1)
hprebn = embcat @ W1 + b1
bnmeani = 1/n*hprebn.sum(0, keepdim=True)
bndiff = hprebn - bnmeani
bndiff2 = bndiff**2
bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)
bnvar_inv = (bnvar + 1e-5)**-0.5
bnraw = bndiff * bnvar_inv
hpreact = bngain * bnraw + bnbias
h = torch.tanh(hpreact)
logits = h @ W2 + b2
logit_maxes = logits.max(1, keepdim=True).values
norm_logits = logits - logit_maxes
counts = norm_logits.exp()
counts_sum = counts.sum(1, keepdims=True)
counts_sum_inv = counts_sum**-1
probs = counts * counts_sum_inv
logprobs = probs.log()
loss = -logprobs[range(n), Yb].mean()

for p in parameters:
  p.grad = None
for t in [logprobs, probs, counts, counts_sum, counts_sum_inv,
          norm_logits, logit_maxes, logits, h, hpreact, bnraw,
         bnvar_inv, bnvar, bndiff2, bndiff, hprebn, bnmeani,
         embcat, emb]:
  t.retain_grad()
loss.backward()
loss"""

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

# The lecture's finished exercise 1 cell, as a completed notebook holds it (its dbnmeani has shape (64,)).
EX1 = """dlogprobs = torch.zeros_like(logprobs)
dlogprobs[range(n), Yb] = -1.0/n
dprobs = (1.0 / probs) * dlogprobs
dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
dcounts = counts_sum_inv * dprobs
dcounts_sum = (-counts_sum**-2) * dcounts_sum_inv
dcounts += torch.ones_like(counts) * dcounts_sum
dnorm_logits = counts * dcounts
dlogits = dnorm_logits.clone()
dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
dhpreact = (1.0 - h**2) * dh
dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
dbnraw = bngain * dhpreact
dbnbias = dhpreact.sum(0, keepdim=True)
dbndiff = bnvar_inv * dbnraw
dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
dbnvar = (-0.5*(bnvar + 1e-5)**-1.5) * dbnvar_inv
dbndiff2 = (1.0/(n-1))*torch.ones_like(bndiff2) * dbnvar
dbndiff += (2*bndiff) * dbndiff2
dhprebn = dbndiff.clone()
dbnmeani = (-dbndiff).sum(0)
dhprebn += 1.0/n * (torch.ones_like(hprebn) * dbnmeani)
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
demb = dembcat.view(emb.shape)
dC = torch.zeros_like(C)
for k in range(Xb.shape[0]):
  for j in range(Xb.shape[1]):
    ix = Xb[k,j]
    dC[ix] += demb[k,j]

""" + "\n".join(f"cmp('{t}', d{t}, {t})" for t in NAMES)

EX2_FORWARD = (
    "loss_fast = F.cross_entropy(logits, Yb)\nprint(loss_fast.item(), 'diff:', (loss_fast - loss).item())"
)
EX2 = "dlogits = F.softmax(logits, 1)\ndlogits[range(n), Yb] -= 1\ndlogits /= n\n\ncmp('logits', dlogits, logits)"
EX3_FORWARD = (
    "hpreact_fast = bngain * (hprebn - hprebn.mean(0, keepdim=True)) / torch.sqrt(hprebn.var(0, "
    "keepdim=True, unbiased=True) + 1e-5) + bnbias\nprint('max diff:', (hpreact_fast - hpreact).abs().max())"
)
EX3 = (
    "dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))\n\n"
    "cmp('hprebn', dhprebn, hprebn)"
)

# Exercise 4's cell: the lecture's loop, stopped after `steps` steps as a learner does while checking it.
EX4 = """n_embd = 10
n_hidden = 200

g = torch.Generator().manual_seed(2147483647)
C  = torch.randn((vocab_size, n_embd),            generator=g)
W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * (5/3)/((n_embd * block_size)**0.5)
b1 = torch.randn(n_hidden,                        generator=g) * 0.1
W2 = torch.randn((n_hidden, vocab_size),          generator=g) * 0.1
b2 = torch.randn(vocab_size,                      generator=g) * 0.1
bngain = torch.randn((1, n_hidden))*0.1 + 1.0
bnbias = torch.randn((1, n_hidden))*0.1

parameters = [C, W1, b1, W2, b2, bngain, bnbias]
for p in parameters:
  p.requires_grad = True

max_steps = 200000
batch_size = 32
n = batch_size
lossi = []

with torch.no_grad():
  for i in range(max_steps):
    ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
    Xb, Yb = Xtr[ix], Ytr[ix]

    emb = C[Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    bnmean = hprebn.mean(0, keepdim=True)
    bnvar = hprebn.var(0, keepdim=True, unbiased=True)
    bnvar_inv = (bnvar + 1e-5)**-0.5
    bnraw = (hprebn - bnmean) * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    loss = F.cross_entropy(logits, Yb)

    for p in parameters:
      p.grad = None

    dlogits = F.softmax(logits, 1)
    dlogits[range(n), Yb] -= 1
    dlogits /= n
    dh = dlogits @ W2.T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = (1.0 - h**2) * dh
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    dbnbias = dhpreact.sum(0, keepdim=True)
    dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.view(emb.shape)
    dC = torch.zeros_like(C)
    for k in range(Xb.shape[0]):
      for j in range(Xb.shape[1]):
        ix = Xb[k,j]
        dC[ix] += demb[k,j]
    grads = [dC, dW1, db1, dW2, db2, dbngain, dbnbias]

    lr = 0.1 if i < 100000 else 0.01
    for p, grad in zip(parameters, grads):
      p.data += -lr * grad

    if i % 10000 == 0:
      print(f'{i:7d}/{max_steps:7d}: {loss.item():.4f}')
    lossi.append(loss.log10().item())

    if i >= STEPS:
      break"""


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
