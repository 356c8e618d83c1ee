"""The lecture's four exercises as dojo items (Karpathy, "Becoming a Backprop Ninja"): the graph and
mistake table each is graded with, its probes, its rows with three hints each, and the plain Python file
`handgrad dojo start` writes for it (setup and forward given, the backward left to fill in).
"""

from __future__ import annotations

import textwrap

from handgrad.dojo import catalogue as K
from handgrad.dojo import graph as G
from handgrad.dojo import hints as H
from handgrad.dojo import loop
from handgrad.dojo import probes as P
from handgrad.dojo.framework import BLANK, Item, RowSpec

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

TRAIN_STEPS = loop.STEPS  # the grader's training run of exercise 4

# The rule behind each gradient, in the lecture's names. None says the answer: it names the local
# derivative and how the uses and broadcasts combine.
RULES: dict[str, str] = {
    "logprobs": "loss = -(mean of the picked entries logprobs[range(n), Yb]): each picked entry moves the "
    "loss by -1/n; an entry that is not picked does not enter the loss at all",
    "probs": "logprobs = log(probs): the local derivative of log(x) is 1/x, taken at the input; the chain "
    "rule multiplies it by the upstream gradient",
    "counts_sum_inv": "probs = counts * counts_sum_inv: the derivative of a product with respect to one "
    "factor is the other factor; counts_sum_inv is broadcast across the columns",
    "counts_sum": "counts_sum_inv = counts_sum**-1: the power rule, d(x**k)/dx = k * x**(k-1), at the input",
    "counts": "counts is used twice, in probs = counts * counts_sum_inv and in counts_sum = counts.sum(1): "
    "its gradient is the sum of one term per use; a sum hands its upstream gradient to every element it "
    "added up",
    "norm_logits": "counts = exp(norm_logits): the derivative of exp is exp itself, a value you already have",
    "logit_maxes": "norm_logits = logits - logit_maxes: subtraction hands -1 times the upstream gradient to "
    "what is subtracted; logit_maxes is broadcast across the columns",
    "logits": "logits is used twice: directly in norm_logits (derivative 1) and in logit_maxes, the max of "
    "each row, which passes its gradient only to the entry that was largest",
    "h": "logits = h @ W2 + b2: the gradient with respect to one operand of @ is the upstream gradient "
    "times the other operand, transposed so that the shapes fit",
    "W2": "logits = h @ W2 + b2: the gradient with respect to one operand of @ is the other operand, "
    "transposed, times the upstream gradient, in the order that makes the shapes fit",
    "b2": "b2 is added to every row of h @ W2 (broadcast along dim 0): its gradient adds up the upstream "
    "gradient over the rows",
    "hpreact": "h = tanh(hpreact): d tanh(x)/dx = 1 - tanh(x)**2, and tanh(x) is the output you already have",
    "bngain": "hpreact = bngain * bnraw + bnbias: the other factor times the upstream gradient; bngain is "
    "broadcast over the rows",
    "bnbias": "hpreact = bngain * bnraw + bnbias: a sum passes the upstream gradient through; bnbias is "
    "broadcast over the rows",
    "bnraw": "hpreact = bngain * bnraw + bnbias: the derivative with respect to bnraw is the other factor",
    "bnvar_inv": "bnraw = bndiff * bnvar_inv: the other factor times the upstream gradient; bnvar_inv is "
    "broadcast over the rows",
    "bnvar": "bnvar_inv = (bnvar + 1e-5)**-0.5: the power rule at the input, with the eps where the "
    "forward has it",
    "bndiff2": "bnvar = 1/(n-1) * bndiff2.sum(0): the sum hands the upstream gradient to every row it "
    "added up, times the constant in front (Bessel's n-1, as in the forward)",
    "bndiff": "bndiff is used twice, in bndiff2 = bndiff**2 and in bnraw = bndiff * bnvar_inv: one term "
    "per use, added",
    "bnmeani": "bndiff = hprebn - bnmeani: subtraction hands -1 times the upstream gradient to bnmeani, "
    "which is broadcast over the rows",
    "hprebn": "hprebn is used twice: directly in bndiff (derivative 1) and in bnmeani = 1/n * "
    "hprebn.sum(0), which hands its upstream to every row, times 1/n",
    "embcat": "hprebn = embcat @ W1 + b1: the upstream gradient times the other operand, transposed so "
    "that the shapes fit",
    "W1": "hprebn = embcat @ W1 + b1: the other operand, transposed, times the upstream gradient, in the "
    "order that makes the shapes fit",
    "b1": "b1 is added to every row (broadcast along dim 0): add up the upstream gradient over the rows",
    "emb": "embcat = emb.view(n, -1) only rearranges the numbers: the gradient is the upstream one, "
    "rearranged back to emb's shape",
    "C": "emb = C[Xb]: every row of emb is a copy of a row of C; a row of C gets the sum of the gradients "
    "of all its copies, and a character can be picked many times in one batch",
}

# Exercises 2-4 write two gradients in closed form: their rules differ from the atomic ones.
CLOSED_RULES: dict[str, str] = {
    "logits": "loss = mean over the rows of -log softmax(logits)[Yb]: for one row, the derivative of "
    "-log softmax(x)[y] with respect to x is the softmax of x, minus 1 at the target y; the mean over the "
    "batch divides by n",
    "hprebn": "hpreact = bngain * (hprebn - mean) / sqrt(var + 1e-5) + bnbias, with the variance over n-1: "
    "hprebn reaches hpreact three ways (directly, through the mean, through the variance), so the closed "
    "form has one term per way, all scaled by bngain * bnvar_inv",
}


def _rows(graph: G.Graph, shapes: dict[str, str], solution: str, closed: bool) -> tuple[RowSpec, ...]:
    out = []
    for g in graph.grads:
        rule = CLOSED_RULES[g] if closed and g in CLOSED_RULES else RULES[g]
        hints = (rule, H.shapes_hint(graph, shapes, g), H.form_hint(solution, g))
        out.append(RowSpec(g, f"d{g}", f"d{g}", shapes.get(g, ""), hints))
    return tuple(out)


def _blanks(graph: G.Graph, shapes: dict[str, str]) -> str:
    """The region of a fresh file: one marked blank per gradient, with the shape it must have."""
    return "\n".join(f"d{g} = {BLANK} {shapes.get(g, '')}".rstrip() for g in graph.grads) + "\n"


def _text(title: str, slug: str, forward: str, given: str = "") -> str:
    return (
        f'"""{title}.\n\nFill in every gradient between the `# >>>` and `# <<<` lines (replace each '
        f"None), then run\n    handgrad dojo grade {slug}.py\nThe grader runs only the lines between "
        "the markers, statement by statement, and feeds each\nof your gradients the correct upstream "
        'gradients, so a mistake shows once, where it is.\n"""\n'
        f"{_SETUP}{forward}{given}\n"
        "# >>> your backward pass: d<name> is the gradient of loss with respect to <name>, same shape\n"
        "@@0@@\n# <<<\n\n"
        'if __name__ == "__main__":\n'
        f'    print(f"loss {{loss.item():.6f}}; grade it: handgrad dojo grade {{__file__}}")\n'
    )


def _loop_text(title: str, slug: str, forward: str) -> str:
    """Exercise 4's file: the lecture's training loop with the backward pass left to fill in."""
    fwd = textwrap.indent(forward.strip("\n"), "    ")
    return (
        f'"""{title}.\n\nFill in every gradient between the `# >>>` and `# <<<` lines, then run\n'
        f"    handgrad dojo grade {slug}.py\n"
        "The grader runs your lines once per gradient with the correct upstream gradients fed in, then "
        f"trains\n{TRAIN_STEPS} steps with them alone and holds the loss curve against autograd's.\n"
        '"""\n'
        f"{_SETUP}"
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
        "    @@0@@\n    # <<<\n\n"
        "    grads = [dC, dW1, db1, dW2, db2, dbngain, dbnbias]\n"
        "    for p, grad in zip(parameters, grads):\n"
        "        p -= lr * grad  # plain SGD\n"
        "    if i % 100 == 0:\n"
        '        print(f"{i:5d}/{max_steps}: loss {loss.item():.4f}")\n'
    )


def _exercise(
    key: str,
    slug: str,
    title: str,
    about: str,
    graph: G.Graph,
    table: dict,
    probes,
    forward: str,
    shapes: dict[str, str],
    solution: str,
    given: str = "",
    training: bool = False,
) -> Item:
    text = _loop_text(title, slug, forward) if training else _text(title, slug, forward, given)
    return Item(
        key,
        "exercise",
        slug,
        title,
        about,
        text,
        (_blanks(graph, shapes),),
        (solution,),
        _rows(graph, shapes, solution, key != "1"),
        probes,
        "region",
        variants=table,
        graph=graph,
        training=training,
        notebook={"graph": G.LECTURE if key == "1" else G.CROSS_ENTROPY},
    )


EXERCISES: tuple[Item, ...] = (
    _exercise(
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
    _exercise(
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
    _exercise(
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
    _exercise(
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
        training=True,
    ),
)
