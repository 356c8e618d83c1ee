"""The dojo's exercises as data (Karpathy, "Becoming a Backprop Ninja"): what each is, the graph and
mistake table it is graded with, and the plain Python file `handgrad dojo start` writes for it.
"""

from __future__ import annotations

import os
import re
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from handgrad.dojo import catalogue as K
from handgrad.dojo import graph as G
from handgrad.dojo import probes as P

MARK = re.compile(r"^# handgrad dojo: exercise (\S+)\s*$", re.M)  # the line that names a file's exercise
BLANK = "None  # TODO"  # how a gradient starts out in a fresh file


@dataclass(frozen=True)
class Exercise:
    key: str  # "1", as typed on the command line
    slug: str  # the file name's stem
    title: str
    about: str  # one line for `dojo list`
    graph: G.Graph
    table: dict[str, tuple[K.Variant, ...]]
    probes: Callable[[], list[P.Probe]]
    forward: str  # the given forward pass, the lecture's lines
    shapes: dict[str, str]  # gradient name -> its shape in words, for the blank's comment
    solution: str  # the reference backward, the lines between the markers
    kind: str = "graph"  # how the child runs it: "graph" (local grading), "training" (also the loop)
    given: str = ""  # lines after the forward pass and before the region (exercise 3's dhpreact)
    hints: dict[str, tuple[str, ...]] = field(default_factory=dict)  # gradient -> rule, shapes, form

    @property
    def grads(self) -> tuple[str, ...]:
        return self.graph.grads


_SETUP = """import torch
import torch.nn.functional as F

from handgrad.dojo.setup import lecture_setup

# The lecture's setup: the names dataset, n_embd 10, n_hidden 64, a batch of 32, float32.
C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb = lecture_setup()
vocab_size, n_embd = C.shape
n_hidden = W1.shape[1]
block_size = Xb.shape[1]
n = batch_size = Xb.shape[0]
"""

_LECTURE_FORWARD = """
# Forward pass, "chunkated" into smaller steps that are possible to backward one at a time.
emb = C[Xb]  # embed the characters into vectors
embcat = emb.view(emb.shape[0], -1)  # concatenate the vectors
# Linear layer 1
hprebn = embcat @ W1 + b1  # hidden layer pre-activation
# BatchNorm layer
bnmeani = 1 / n * hprebn.sum(0, keepdim=True)
bndiff = hprebn - bnmeani
bndiff2 = bndiff**2
bnvar = 1 / (n - 1) * (bndiff2).sum(0, keepdim=True)  # note: Bessel's correction (dividing by n-1, not n)
bnvar_inv = (bnvar + 1e-5) ** -0.5
bnraw = bndiff * bnvar_inv
hpreact = bngain * bnraw + bnbias
# Non-linearity
h = torch.tanh(hpreact)  # hidden layer
# Linear layer 2
logits = h @ W2 + b2  # output layer
# cross entropy loss (same as F.cross_entropy(logits, Yb))
logit_maxes = logits.max(1, keepdim=True).values
norm_logits = logits - logit_maxes  # subtract max for numerical stability
counts = norm_logits.exp()
counts_sum = counts.sum(1, keepdims=True)
counts_sum_inv = counts_sum**-1
probs = counts * counts_sum_inv
logprobs = probs.log()
loss = -logprobs[range(n), Yb].mean()
"""

_LECTURE_SHAPES = {
    "logprobs": "(n, vocab_size)",
    "probs": "(n, vocab_size)",
    "counts_sum_inv": "(n, 1)",
    "counts_sum": "(n, 1)",
    "counts": "(n, vocab_size)",
    "norm_logits": "(n, vocab_size)",
    "logit_maxes": "(n, 1)",
    "logits": "(n, vocab_size)",
    "h": "(n, n_hidden)",
    "W2": "(n_hidden, vocab_size)",
    "b2": "(vocab_size,)",
    "hpreact": "(n, n_hidden)",
    "bngain": "(1, n_hidden)",
    "bnbias": "(1, n_hidden)",
    "bnraw": "(n, n_hidden)",
    "bnvar_inv": "(1, n_hidden)",
    "bnvar": "(1, n_hidden)",
    "bndiff2": "(n, n_hidden)",
    "bndiff": "(n, n_hidden)",
    "bnmeani": "(1, n_hidden)",
    "hprebn": "(n, n_hidden)",
    "embcat": "(n, block_size * n_embd)",
    "W1": "(block_size * n_embd, n_hidden)",
    "b1": "(n_hidden,)",
    "emb": "(n, block_size, n_embd)",
    "C": "(vocab_size, n_embd)",
}

# The reference answer of exercise 1, written as the lecture writes it (every line a learner could type).
_LECTURE_SOLUTION = """dlogprobs = torch.zeros_like(logprobs)
dlogprobs[range(n), Yb] = -1.0 / n
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
dbnbias = dhpreact.sum(0, keepdim=True)
dbnraw = bngain * dhpreact
dbndiff = bnvar_inv * dbnraw
dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvar_inv
dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(bndiff2) * dbnvar
dbndiff += (2 * bndiff) * dbndiff2
dhprebn = dbndiff.clone()
dbnmeani = (-dbndiff).sum(0, keepdim=True)
dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
demb = dembcat.view(emb.shape)
dC = torch.zeros_like(C)
for k in range(Xb.shape[0]):
    for j in range(Xb.shape[1]):
        ix = Xb[k, j]
        dC[ix] += demb[k, j]
"""

# Exercises 2-4: the lecture's forward with cross-entropy and batchnorm each in one piece; the names of
# the batchnorm statistics (bnmeani ... bnraw) are kept because the closed forms use them.
_COMPACT_FORWARD = """
# Forward pass: the same network, cross-entropy in one call.
emb = C[Xb]  # (n, block_size, n_embd)
embcat = emb.view(emb.shape[0], -1)  # (n, block_size * n_embd)
hprebn = embcat @ W1 + b1  # (n, n_hidden)
bnmeani = 1 / n * hprebn.sum(0, keepdim=True)  # (1, n_hidden)
bndiff = hprebn - bnmeani  # (n, n_hidden)
bnvar = 1 / (n - 1) * (bndiff**2).sum(0, keepdim=True)  # (1, n_hidden)  Bessel's correction: n-1
bnvar_inv = (bnvar + 1e-5) ** -0.5  # (1, n_hidden)
bnraw = bndiff * bnvar_inv  # (n, n_hidden)
hpreact = bngain * bnraw + bnbias  # (n, n_hidden)
h = torch.tanh(hpreact)  # (n, n_hidden)
logits = h @ W2 + b2  # (n, vocab_size)
loss = F.cross_entropy(logits, Yb)
"""

_CE_SOLUTION = """dlogits = F.softmax(logits, 1)
dlogits[range(n), Yb] -= 1
dlogits /= n
"""

_BN_GIVEN = """
# Given: the upstream gradient dhpreact (autograd's here; the grader feeds its own).
from handgrad.dojo.setup import lecture_gradients

dhpreact = lecture_gradients(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb)["hpreact"]  # (n, n_hidden)
"""

_BN_SOLUTION = """dhprebn = bngain * bnvar_inv / n * (
    n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0)
)
"""

# Exercise 4's backward: the closed forms of exercises 2 and 3, then the lecture's lines below hpreact.
_TRAINING_SOLUTION = (
    _CE_SOLUTION
    + """dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
dhpreact = (1.0 - h**2) * dh
dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
dbnbias = dhpreact.sum(0, keepdim=True)
"""
    + _BN_SOLUTION
    + """dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
demb = dembcat.view(emb.shape)
dC = torch.zeros_like(C)
dC.index_add_(0, Xb.view(-1), demb.view(-1, n_embd))
"""
)

TRAIN_STEPS, TRAIN_LR, TRAIN_SEED = 100, 0.1, 42  # the grader's training run (exercise 4)
CURVE_STEPS = 20  # the first steps, where the loss must follow autograd's step for step

EXERCISES: dict[str, Exercise] = {
    "1": Exercise(
        "1",
        "ex1_atomic",
        "Exercise 1: backprop through the whole graph, one atomic step at a time",
        "the 26 atomic gradients (dlogprobs ... dC), n_hidden 64, batch 32",
        G.LECTURE,
        K.LECTURE_TABLE,
        P.lecture_probes,
        _LECTURE_FORWARD,
        _LECTURE_SHAPES,
        _LECTURE_SOLUTION,
    ),
    "2": Exercise(
        "2",
        "ex2_cross_entropy",
        "Exercise 2: the backward of cross-entropy in one expression",
        "dlogits in closed form (softmax minus one-hot, over n)",
        G.CROSS_ENTROPY,
        K.CE_TABLE,
        P.cross_entropy_probes,
        _COMPACT_FORWARD,
        {"logits": "(n, vocab_size)"},
        _CE_SOLUTION,
    ),
    "3": Exercise(
        "3",
        "ex3_batchnorm",
        "Exercise 3: the backward of batchnorm in one expression",
        "dhprebn in closed form, given dhpreact (batchnorm with Bessel's n-1)",
        G.BATCHNORM,
        K.BN_TABLE,
        P.batchnorm_probes,
        _COMPACT_FORWARD,
        {"hprebn": "(n, n_hidden)", "hpreact": "(n, n_hidden)"},
        _BN_SOLUTION,
        given=_BN_GIVEN,
    ),
    "4": Exercise(
        "4",
        "ex4_training",
        "Exercise 4: train the network with your backward pass, no loss.backward()",
        f"the training loop by hand: 13 gradients, then {TRAIN_STEPS} steps against autograd's loss curve",
        G.TRAINING,
        K.TRAINING_TABLE,
        P.training_probes,
        _COMPACT_FORWARD,
        {k: _LECTURE_SHAPES[k] for k in G.TRAINING.grads},
        _TRAINING_SOLUTION,
        kind="training",
    ),
}


def get(key: str) -> Exercise:
    """The exercise called `key` ("1", or its slug); ValueError names the ones there are."""
    for ex in EXERCISES.values():
        if key in (ex.key, ex.slug):
            return ex
    raise ValueError(f"no exercise {key!r}; there are: {', '.join(EXERCISES)} (see `handgrad dojo list`)")


def blanks(ex: Exercise) -> str:
    """The region of a fresh file: one marked blank per gradient, with the shape it must have."""
    return "\n".join(f"d{g} = {BLANK} {ex.shapes.get(g, '')}".rstrip() for g in ex.graph.grads) + "\n"


def template(ex: Exercise, region: str | None = None) -> str:
    """The file `dojo start` writes: setup and forward given, then `region` between the markers (by
    default each gradient a marked blank; `solution` passes the reference)."""
    region = blanks(ex) if region is None else region
    if ex.kind == "training":
        return _loop_template(ex, region)
    return (
        f'"""{ex.title}.\n\nFill in every gradient between the `# >>>` and `# <<<` lines (replace each '
        f"None), then run\n    handgrad dojo grade {ex.slug}.py\nThe grader runs only the lines between "
        "the markers, statement by statement, and feeds each\nof your gradients the correct upstream "
        'gradients, so a mistake shows once, where it is.\n"""\n'
        f"# handgrad dojo: exercise {ex.key}\n{_SETUP}{ex.forward}{ex.given}\n"
        f"# >>> your backward pass: d<name> is the gradient of loss with respect to <name>, same shape\n"
        f"{region}# <<<\n\n"
        'if __name__ == "__main__":\n'
        f'    print(f"loss {{loss.item():.6f}}; grade it: handgrad dojo grade {{__file__}}")\n'
    )


def _loop_template(ex: Exercise, region: str) -> str:
    """Exercise 4's file: the lecture's training loop with the backward pass left to fill in."""
    fwd = textwrap.indent(ex.forward.strip("\n"), "    ")
    body = textwrap.indent(region, "    ")
    return (
        f'"""{ex.title}.\n\nFill in every gradient between the `# >>>` and `# <<<` lines, then run\n'
        f"    handgrad dojo grade {ex.slug}.py\n"
        "The grader runs your lines once per gradient with the correct upstream gradients fed in, then "
        f"trains\n{TRAIN_STEPS} steps with them alone and holds the loss curve against autograd's.\n"
        '"""\n'
        f"# handgrad dojo: exercise {ex.key}\n{_SETUP}"
        "\nfrom handgrad.dojo.setup import lecture_dataset  # noqa: E402\n\n"
        "parameters = [C, W1, b1, W2, b2, bngain, bnbias]\n"
        'X, Y = lecture_dataset("train")\n'
        "g = torch.Generator().manual_seed(42)\n"
        "max_steps, lr = 2000, 0.1\n"
        "for i in range(max_steps):\n"
        "    ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)\n"
        "    Xb, Yb = X[ix], Y[ix]  # the minibatch\n"
        f"{fwd}\n\n"
        "    # >>> your backward pass: d<name> is the gradient of loss with respect to <name>, same shape\n"
        f"{body}    # <<<\n\n"
        "    grads = [dC, dW1, db1, dW2, db2, dbngain, dbnbias]\n"
        "    for p, grad in zip(parameters, grads):\n"
        "        p -= lr * grad  # plain SGD\n"
        "    if i % 100 == 0:\n"
        '        print(f"{i:5d}/{max_steps}: loss {loss.item():.4f}")\n'
    )


def start(key: str, directory: str | Path = ".") -> Path:
    """Write exercise `key`'s file into `directory` and return its path. FileExistsError if a file of
    that name is there already: a learner's work is never overwritten."""
    ex = get(key)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{ex.slug}.py"
    text = template(ex)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{ex.slug}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.link(tmp, path)  # atomic, and fails if the file exists (never overwrites)
    finally:
        os.unlink(tmp)
    return path


def exercise_of(source: str) -> str | None:
    """The exercise a file says it is (its `# handgrad dojo: exercise K` line), or None."""
    m = MARK.search(source)
    return m.group(1) if m else None
