"""The conceptual questions given alongside Karpathy's "Building makemore Part 4: Becoming a Backprop
Ninja", as data: each question's text, its parts with their answer forms (numbers, choices, PyTorch
expressions run on random tensors against autograd), the typical wrong answers and what each means,
three graded hints per part and the explanation. `answers.py` grades them; `experiments.py` shows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from handgrad.dojo.answers import Choice, ExpressionForm, Mistake, NumberForm, Part, Probe

SEED = 2147483647  # the lecture's generator seed: every probe is drawn from it


@dataclass(frozen=True)
class Question:
    number: int  # 1..6, as the lecture's list numbers them
    slug: str  # a name for it ("routing")
    title: str
    about: str  # one line for `handgrad dojo list`
    text: str  # the question as asked
    parts: tuple[Part, ...]
    explanation: str

    @property
    def key(self) -> str:
        return f"q{self.number}"

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)


def _gen(k: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + k)


def _upstream(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    """A random upstream gradient whose entries are at least 0.5 from 0 and 0.25 from +-1 (a dy of 1 or
    0 would hide a missing factor)."""
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    m = u.abs() + 0.5
    m = torch.where((m - 1).abs() < 0.25, m + 0.5, m)
    return torch.where(u < 0, -m, m)


def _grad_of(x: Tensor, f, dy: Tensor) -> Tensor:
    """autograd's d<x> for y = f(x) with upstream dy (float64)."""
    x = x.detach().clone().requires_grad_(True)
    f(x).backward(dy)
    return x.grad.detach()


# ---------------------------------------------------------------------------- Q1 gradient routing
A, B, DY = 2.0, 3.0, 5.0
ROUTING_NAMES = {"a": A, "b": B, "dy": DY}
_ADD_HINTS = (
    "The chain rule: da = (the local derivative of y with respect to a) * dy. What is the local derivative "
    "of a + b with respect to a?",
    "d(a + b)/da = 1, whatever a and b are: the addition passes the upstream gradient through unchanged.",
    "da = 1 * dy = 5 and db = 1 * dy = 5: a '+' node copies dy to each of its inputs.",
)
_MUL_HINTS = (
    "The chain rule again: da = (the local derivative of y with respect to a) * dy. Hold b fixed: how much "
    "does a * b change when a grows by 1?",
    "d(a * b)/da = b and d(a * b)/db = a: each input's local derivative is the other input.",
    "da = b * dy = 3 * 5 = 15 and db = a * dy = 2 * 5 = 10: a '*' node swaps its inputs and scales by dy.",
)


def _add_mistakes(name: str) -> tuple[Mistake, ...]:
    return (
        Mistake(1.0, f"1 is the local derivative d(a + b)/{name} alone; the chain rule multiplies it by "
                "the upstream dy = 5"),
        Mistake(2.5, "a sum does not split dy between its inputs: each input gets all of it (2.5 is half)"),
        Mistake(2.0, "2 is a's value; an addition's local derivative is 1 whatever the inputs are, so "
                f"{name} = 1 * dy"),
        Mistake(3.0, "3 is b's value; an addition's local derivative is 1 whatever the inputs are, so "
                f"{name} = 1 * dy"),
        Mistake(0.0, "0 would mean the input does not affect y; y = a + b grows by 1 for each unit of "
                f"{name[1:]}"),
        Mistake(10.0, "10 = 2 * dy: each input appears once in a + b, so it gets dy once"),
    )


def _mul_mistakes(name: str, other: float, mine: float) -> tuple[Mistake, ...]:
    return (
        Mistake(other, f"{other:g} is the other factor, the local derivative of a * b alone; the chain rule "
                "multiplies it by the upstream dy = 5"),
        Mistake(mine * DY, f"{mine * DY:g} = {name[1:]} * dy: that is the other input's gradient; "
                "each input of a product gets the OTHER factor times dy"),
        Mistake(DY, "5 is dy passed through unchanged, as a sum would; a product scales it by the other "
                "factor"),
        Mistake(A * B * DY, "30 = a * b * dy: the local derivative of a * b with respect to one factor is "
                "the other factor, not the product"),
        Mistake(mine, f"{mine:g} is {name[1:]}'s own value; its gradient is the other factor times dy"),
        Mistake(A * B, "6 = a * b is y's value, the forward pass; the backward multiplies dy by a local "
                "derivative"),
    )


ROUTING = Question(
    1, "routing", "Gradient routing",
    "what a '+' node and a '*' node do to the upstream gradient (numbers)",
    "In y = a + b with dy = 5 (the gradient of the loss with respect to y), what are da and db? "
    "And for y = a * b with a = 2, b = 3 and the same dy = 5?",
    (
        Part("add.da", "y = a + b, dy = 5: da =", _ADD_HINTS, ("5", "dy", "1*5", "5.0"),
             number=NumberForm(5.0, names=ROUTING_NAMES), mistakes=_add_mistakes("da")),
        Part("add.db", "y = a + b, dy = 5: db =", _ADD_HINTS, ("5", "dy"),
             number=NumberForm(5.0, names=ROUTING_NAMES), mistakes=_add_mistakes("db")),
        Part("mul.da", "y = a * b, a = 2, b = 3, dy = 5: da =", _MUL_HINTS, ("15", "b*dy", "3*5", "15.0"),
             number=NumberForm(15.0, names=ROUTING_NAMES), mistakes=_mul_mistakes("da", B, A)),
        Part("mul.db", "y = a * b, a = 2, b = 3, dy = 5: db =", _MUL_HINTS, ("10", "a*dy", "2*5"),
             number=NumberForm(10.0, names=ROUTING_NAMES), mistakes=_mul_mistakes("db", A, B)),
    ),
    "A '+' node routes the upstream gradient unchanged to every input: its local derivatives are all 1, "
    "so da = db = dy = 5 (a gradient distributor). A '*' node sends each input the other input times the "
    "upstream: da = b * dy = 15, db = a * dy = 10 (a swap, then a scale). In the lecture's "
    "hpreact = bngain * bnraw + bnbias, the '+' hands dhpreact to bnbias (summed over the rows it was "
    "added to: dbnbias = dhpreact.sum(0, keepdim=True)) and the '*' gives dbngain = "
    "(bnraw * dhpreact).sum(0, keepdim=True) and dbnraw = bngain * dhpreact.",
)


# ---------------------------------------------------------------------------- Q2 sparse gradients
def _label_probes(k: int, x_name: str, y_name: str, make_x, loss) -> list[Probe]:
    """Random (n, V) inputs and labels, a small problem and one of the lecture's size, each with
    autograd's gradient of the scalar loss(x, labels)."""
    out = []
    for i, (n, V) in enumerate(((6, 5), (32, 27))):
        g = _gen(k + i)
        x = make_x(torch.randn((n, V), generator=g, dtype=torch.float64))  # (n, V)
        y = torch.randint(0, V, (n,), generator=g)  # (n,)
        ref = _grad_of(x, lambda t, y=y: loss(t, y), torch.tensor(1.0, dtype=torch.float64))
        out.append(Probe(f"{x_name} of n = {n} rows over V = {V} characters",
                         {x_name: x, y_name: y, "n": n, "V": V}, ref, {"n": n, "V": V}))
    return out


def _sparse_probes() -> list[Probe]:
    return _label_probes(20, "logprobs", "Yb", lambda u: u.log_softmax(1),
                         lambda lp, Yb: -lp[torch.arange(lp.shape[0]), Yb].mean())


SPARSE = Question(
    2, "sparse", "Sparse gradients",
    "why dlogprobs is mostly zeros, and where it is not (choices, or dlogprobs as an expression)",
    "In the lecture's loss = -logprobs[range(n), Yb].mean(), why is dlogprobs mostly zeros, and which "
    "positions are non-zero?",
    (
        Part("why", "why are most entries of dlogprobs zero?", (
            "Look at what the loss reads: logprobs[range(n), Yb] picks n of its n * V entries.",
            "If an entry of logprobs does not appear in the loss at all, how much does the loss change when "
            "you nudge it?",
            "Not at all: an entry the loss never reads has gradient 0, so only the n picked entries have "
            "one.",
        ), ("a", "(a)", "A"), choices=(
            Choice("a", "the loss reads only one entry of logprobs per row, the one at the target Yb[i]; an "
                   "entry the loss never reads cannot change it, so its gradient is 0", right=True),
            Choice("b", "most probabilities are close to 0, so their gradients vanish",
                   why="a small probability does not make a small gradient (log's derivative 1/p is large "
                   "there); the zeros come from the loss not reading those entries at all"),
            Choice("c", "the max subtracted for numerical stability cancels their gradient",
                   why="logit_maxes acts on the logits, further down the graph; dlogprobs is decided by the "
                   "last line alone, by which entries the loss picks"),
            Choice("d", "the gradient is zero wherever the prediction is already right",
                   why="the picked entry has gradient -1/n whatever its probability; it is every other entry "
                   "that has 0, because the loss does not use it"),
        )),
        Part("where", "which positions of dlogprobs are non-zero?", (
            "Which column does row i pick in logprobs[range(n), Yb]?",
            "Row i picks column Yb[i], the label; the mean over n rows scales each picked entry by 1/n and "
            "the minus sign flips it.",
            "dlogprobs[range(n), Yb] = -1/n and zeros elsewhere: one non-zero per row, at the target "
            "(as an expression: -F.one_hot(Yb, V) / n).",
        ), ("a", "target", "-F.one_hot(Yb, V) / n", "-F.one_hot(Yb, logprobs.shape[1]).double() / n",
            "F.one_hot(Yb, V).bool()", "torch.zeros_like(logprobs).index_put((torch.arange(n), Yb), "
            "torch.tensor(-1.0 / n, dtype=torch.float64))", "-torch.eye(V)[Yb] / n"), choices=(
            Choice("a", "one per row: row i, column Yb[i] (the correct next character), each -1/n",
                   right=True, aliases=("target", "targets", "labels")),
            Choice("b", "one per row, at the column of the row's largest logit (the prediction), each -1/n",
                   why="the loss picks by the label Yb, not by the prediction; the two coincide only where "
                   "the model is right"),
            Choice("c", "one per row at column Yb[i], each -1",
                   why="the positions are right but the value is not: the mean divides by n, so each "
                   "picked entry moves the loss by -1/n"),
            Choice("d", "every entry whose probability is above 1/V",
                   why="the probabilities do not decide which entries the loss reads; the labels do"),
        ), expression=ExpressionForm("dlogprobs", {
            "logprobs": "(n, V) the log-probabilities", "Yb": "(n,) the labels", "n": "the batch size",
            "V": "the vocabulary size"}, _sparse_probes, mask=True),
            mistakes=(
                Mistake("-F.one_hot(Yb, V)", "-1 at the targets where -1/n is right: the loss is the mean "
                        "over the n rows, so each picked entry counts 1/n"),
                Mistake("F.one_hot(Yb, V) / n", "the positions and size are right but the sign is flipped: "
                        "the loss is MINUS the mean of the picked log-probabilities"),
                Mistake("-torch.ones_like(logprobs) / n", "every entry is -1/n here, but the loss reads only "
                        "one entry per row: the others have gradient 0"),
                Mistake("-F.one_hot(logprobs.argmax(1), V) / n", "at each row's most likely character: the "
                        "loss picks the label Yb[i], not the prediction"),
                Mistake("torch.ones_like(logprobs).bool()", "every position: only one per row is read by "
                        "the loss"),
            )),
    ),
    "loss = -mean_i logprobs[i, Yb[i]] reads one entry per row: n of the n * V entries (32 of 864 in the "
    "lecture's batch). An entry the loss never reads has gradient 0, and each picked entry moves the loss "
    "by -1/n. So dlogprobs is zeros with -1/n at (i, Yb[i]): `dlogprobs = torch.zeros_like(logprobs); "
    "dlogprobs[range(n), Yb] = -1.0 / n`. The gradient becomes dense again further down: the softmax's "
    "normalisation spreads it over every logit of the row (dlogits is dense).",
)


# ---------------------------------------------------------------------------- Q3 the duality
def _sum_probes() -> list[Probe]:
    out = []
    for k, shape in enumerate(((5,), (4, 3), (2, 3, 4))):
        g = _gen(30 + k)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
        dy = _upstream((), g)
        out.append(Probe(f"x of shape {shape} with dy = {float(dy):.3g}", {"x": x, "dy": dy},
                         _grad_of(x, torch.sum, dy), {"numel": x.numel()}))
    return out


BROADCASTS = (  # x's shape, the shape it is broadcast to, the lecture's tensor it stands for
    ((1, 6), (5, 6), "bngain (1, H) -> (N, H)"),
    ((5, 1), (5, 7), "counts_sum_inv (N, 1) -> (N, V)"),
    ((7,), (5, 7), "b2 (V,) -> (N, V)"),
)


def _broadcast_probes() -> list[Probe]:
    out = []
    for k, (small, big, lecture) in enumerate(BROADCASTS):
        g = _gen(40 + k)
        x = torch.randn(small, generator=g, dtype=torch.float64)
        dy = _upstream(big, g)
        ref = _grad_of(x, lambda t, big=big: t.broadcast_to(big), dy)
        out.append(Probe(f"x {small} broadcast to {big}, as {lecture}", {"x": x, "dy": dy, "shape": big}, ref,
                         {"N": big[0]}))
    return out


DUALITY = Question(
    3, "duality", "The duality",
    "the backward of a sum is a broadcast, and of a broadcast a sum (PyTorch expressions)",
    "If the forward computes y = x.sum(), what is dx, given dy? And for y = x.broadcast_to(shape)? "
    "Answer each with a PyTorch expression in x, dy (and shape); it is run on random tensors and held "
    "against autograd, the broadcast on the lecture's three: bngain (1, H) -> (N, H), counts_sum_inv "
    "(N, 1) -> (N, V) and b2 (V,) -> (N, V).",
    (
        Part("sum", "y = x.sum(): dx =", (
            "Each element of x enters the sum once, with local derivative 1. What does the chain rule give "
            "each element?",
            "Every element of x gets the same gradient, 1 * dy: dx has x's shape and holds dy everywhere.",
            "dx = dy.expand_as(x) (or torch.ones_like(x) * dy): the backward of a sum is a broadcast.",
        ), ("dy.expand_as(x)", "dy * torch.ones_like(x)", "torch.ones_like(x) * dy", "dy.expand(x.shape)",
            "torch.full_like(x, dy.item())", "dy.broadcast_to(x.shape)", "torch.zeros_like(x) + dy",
            "dx = dy.expand_as(x)", "torch.ones(x.shape) * dy"),
            expression=ExpressionForm("dx", {"x": "the input (any shape)",
                                             "dy": "the upstream, a 0-d tensor"}, _sum_probes),
            mistakes=(
                Mistake("dy", "dy is one number; dx must have x's shape: each element of x gets dy "
                        "(expand it: dy.expand_as(x))"),
                Mistake("torch.ones_like(x)", "ones is the local derivative alone; the chain rule multiplies "
                        "it by the upstream dy"),
                Mistake("dy * x", "that is a product's rule (the other factor times dy); in a sum each "
                        "element's local derivative is 1, not its value"),
                Mistake("dy.expand_as(x) / x.numel()", "that is the backward of x.mean(); a sum does not "
                        "divide: each element gets all of dy"),
                Mistake("x", "x is the forward input; the backward of a sum hands dy to every element"),
                Mistake("torch.ones_like(x) / x.numel()", "that is the mean's local derivative, and without "
                        "the upstream dy"),
            )),
        Part("broadcast", "y = x.broadcast_to(shape): dx =", (
            "Broadcasting uses each element of x several times (once per copy). A tensor used several times "
            "gets the sum of the gradients of its uses.",
            "Sum dy over the dims that broadcasting created: the leading dims x did not have, and the dims "
            "where x has size 1 (keeping them, so dx has x's shape).",
            "dx = dy.sum_to_size(x.shape); for bngain (1, H) that is dy.sum(0, keepdim=True), for b2 (V,) "
            "dy.sum(0), for counts_sum_inv (N, 1) dy.sum(1, keepdim=True).",
        ), ("dy.sum_to_size(x.shape)", "dy.sum_to_size(x.size())", "dy.sum_to_size(*x.shape)",
            "dy.sum(0, keepdim=True) if x.shape[0] == 1 else dy.sum(1, keepdim=True) if x.dim() == 2 "
            "else dy.sum(0)"),
            expression=ExpressionForm("dx", {"x": "the input", "dy": "the upstream, of the broadcast shape",
                                             "shape": "the shape x is broadcast to"}, _broadcast_probes),
            mistakes=(
                Mistake("dy", "dy has the broadcast shape; dx must have x's: every element of x was copied "
                        "several times and gets the sum of its copies' gradients"),
                Mistake("dy.mean(0, keepdim=True) if x.shape[0] == 1 else dy.mean(1, keepdim=True) "
                        "if x.dim() == 2 else dy.mean(0)", "the mean of the copies' gradients, N times too "
                        "small: each copy contributes its whole gradient, so add them"),
                Mistake("dy.sum()", "summed over everything into one number: sum only over the dims that "
                        "broadcasting created, and keep x's shape"),
            )),
    ),
    "Forward and backward swap: a sum's backward is a broadcast (y = x.sum() gives every element of x the "
    "same dy: dx = dy.expand_as(x)), and a broadcast's backward is a sum (each element of x was used once "
    "per copy, so its gradient adds up the copies': dx = dy.sum_to_size(x.shape)). The lecture does both "
    "all the time: bnmeani = 1/n * hprebn.sum(0, keepdim=True) sends dbnmeani / n back to every row, and "
    "bngain, broadcast over the batch, gets dbngain = (bnraw * dhpreact).sum(0, keepdim=True).",
)


# ---------------------------------------------------------------------------- Q4 saturation
SATURATION = Question(
    4, "saturation", "Saturation check",
    "tanh outputs near 0 against saturated near +-1: what reaches the layer below (choices, a number)",
    "A tanh layer has 90% of its outputs in [-0.1, 0.1]: good or bad for gradient flow? And if 90% are in "
    "[-1, -0.9] or [0.9, 1]?",
    (
        Part("small", "90% of h in [-0.1, 0.1]: good or bad for gradient flow?", (
            "The tanh's backward is dhpreact = (1 - h**2) * dh. What is 1 - h**2 when |h| <= 0.1?",
            "|h| <= 0.1 gives 1 - h**2 >= 0.99: what reaches the layer below is 99% or more of dh.",
            "Good: a factor close to 1 passes the gradient through (near 0 the tanh is almost linear, which "
            "is a question for the forward pass, not for gradient flow).",
        ), ("a", "good", "Good", "(a)"), choices=(
            Choice("a", "good: 1 - h**2 >= 0.99 there, so the tanh passes the gradient on almost unchanged",
                   right=True, aliases=("good",)),
            Choice("b", "bad: the outputs are small, so the gradient vanishes",
                   why="the gradient through tanh is multiplied by 1 - h**2, not by h: small outputs give a "
                   "factor near 1, the best case", aliases=("bad",)),
            Choice("c", "bad: near 0 tanh is linear, so its gradient explodes",
                   why="linear means slope 1, not a large slope: the factor 1 - h**2 is at most 1 and is "
                   "about 1 here"),
        )),
        Part("saturated", "90% of h in [-1, -0.9] or [0.9, 1]: good or bad for gradient flow?", (
            "The same formula: what is 1 - h**2 for |h| between 0.9 and 1?",
            "Between 0.19 and 0: the gradient that reaches the layer below is cut at least 5x, and to "
            "nothing at |h| = 1.",
            "Bad: saturated units pass almost no gradient (the lecture's white cells in "
            "plt.imshow(h.abs() > 0.99)); a unit saturated on every example is dead, it never learns.",
        ), ("b", "bad", "BAD"), choices=(
            Choice("a", "good: the units are confident, so their gradients are strong",
                   why="confidence in the forward pass is what kills the gradient: it is multiplied by "
                   "1 - h**2 <= 0.19 when |h| >= 0.9, and by ~0 near +-1", aliases=("good",)),
            Choice("b", "bad: 1 - h**2 <= 0.19 there; the gradient is cut at least 5x (to ~0 near +-1), so "
                   "the layers below learn slowly or not at all", right=True, aliases=("bad",)),
            Choice("c", "no effect: the tanh's gradient does not depend on its output",
                   why="it does: d tanh(x)/dx = 1 - tanh(x)**2 = 1 - h**2, written with the output h"),
        )),
        Part("factor", "the factor 1 - h**2 that multiplies the gradient at |h| = 0.9:", (
            "The local derivative of tanh, written with its output h = tanh(x).",
            "d tanh(x)/dx = 1 - tanh(x)**2 = 1 - h**2.",
            "1 - 0.9**2 = 1 - 0.81 = 0.19.",
        ), ("0.19", "1 - 0.9**2", "1 - h**2", ".19", "0.2"),
            number=NumberForm(0.19, atol=0.0101, names={"h": 0.9}),
            mistakes=(
                Mistake(0.1, "1 - |h| = 0.1: the derivative of tanh is 1 - h**2, with the square"),
                Mistake(0.81, "0.81 is h**2; the factor is 1 minus that"),
                Mistake(0.9, "0.9 is h itself; the gradient is multiplied by 1 - h**2"),
                Mistake(1.81, "1 + h**2: the derivative of tanh is 1 MINUS h**2"),
                Mistake(0.0, "not yet 0 at |h| = 0.9: 1 - h**2 = 0.19; it reaches 0 only at |h| = 1"),
            )),
    ),
    "The tanh's backward multiplies the gradient by 1 - h**2. Outputs in [-0.1, 0.1] give a factor of at "
    "least 0.99: the gradient flows on unchanged (good; the layer is nearly linear there, a separate "
    "question). Outputs in [0.9, 1] (or [-1, -0.9]) give at most 1 - 0.81 = 0.19 and ~0 near +-1: the "
    "gradient that reaches the layer below is cut 5x or more and the units stop learning (bad; a unit "
    "saturated on every example is dead). That is why makemore part 3 scales W1 down and uses batchnorm: "
    "to keep the pre-activations where tanh is not flat.",
)


# ---------------------------------------------------------------------------- Q5 cross-entropy's form
def _ce_probes() -> list[Probe]:
    return _label_probes(50, "logits", "Y", lambda u: u * 2, F.cross_entropy)


CROSS_ENTROPY = Question(
    5, "cross-entropy", "Cross-entropy's form",
    "why dlogits = (softmax - one_hot) / n, and what each term does (choices, an expression, a number)",
    "Why is the gradient of loss = F.cross_entropy(logits, Y) with respect to the logits "
    "softmax(logits) - one_hot(Y) (divided by n for the mean over the batch), and what does each term "
    "contribute?",
    (
        Part("why", "why softmax - one_hot?", (
            "Write one row's loss without the softmax: -log(exp(z_y) / sum_j exp(z_j)) = -z_y + log sum_j "
            "exp(z_j).",
            "Differentiate each term: -z_y gives -1 at the target only; log sum exp gives exp(z_j) / sum "
            "exp = softmax_j.",
            "(a): -one_hot from the picked logit, softmax from the normaliser, 1/n from the mean.",
        ), ("a",), choices=(
            Choice("a", "one row's loss is -logits[y] + log(sum_j exp(logits[j])): the first term's "
                   "derivative is -one_hot(y), the log-sum-exp's is exp(logits[j]) / sum exp = softmax; the "
                   "mean over n rows divides both by n", right=True),
            Choice("b", "the derivative of softmax is softmax * (1 - softmax), and the one-hot comes from "
                   "the label", why="softmax * (1 - softmax) is the softmax's derivative with respect to its "
                   "own logit only; through the log the whole Jacobian collapses to softmax - one_hot"),
            Choice("c", "it is an approximation that ignores the normalisation",
                   why="it is exact: the normalisation is the log-sum-exp term, and its derivative is the "
                   "softmax"),
        )),
        Part("dlogits", "dlogits for loss = F.cross_entropy(logits, Y) =", (
            "The loss is the mean over n rows of -log softmax(logits)[i, Y[i]].",
            "Per row the gradient is softmax(logits[i]) minus 1 at column Y[i]; the mean divides by n.",
            "(F.softmax(logits, 1) - F.one_hot(Y, V)) / n",
        ), ("(F.softmax(logits, 1) - F.one_hot(Y, V)) / n", "(logits.softmax(1) - F.one_hot(Y, V)) / n",
            "(F.softmax(logits, dim=1) - F.one_hot(Y, num_classes=V).float()) / n",
            "(logits.exp() / logits.exp().sum(1, keepdim=True) - F.one_hot(Y, V)) / n",
            "(torch.softmax(logits, -1) - torch.eye(V)[Y]) / n",
            "F.softmax(logits, 1) / n - F.one_hot(Y, V) / n"),
            expression=ExpressionForm("dlogits", {"logits": "(n, V)", "Y": "(n,) the labels",
                                                  "n": "the batch size", "V": "the vocabulary size"},
                                      _ce_probes),
            mistakes=(
                Mistake("F.softmax(logits, 1) - F.one_hot(Y, V)", "n times too large: the loss is the mean "
                        "over the n rows, so divide by n"),
                Mistake("F.softmax(logits, 1) / n", "the softmax term alone: the picked logit's -1 (the "
                        "one-hot) is missing"),
                Mistake("(F.softmax(logits, 1) - 1) / n", "1 is subtracted from every entry; the -1 belongs "
                        "only at the target column Y[i] (one_hot)"),
                Mistake("(F.one_hot(Y, V) - F.softmax(logits, 1)) / n", "the sign is flipped: softmax minus "
                        "one_hot, since the loss is MINUS the log-probability"),
                Mistake("(F.softmax(logits, 0) - F.one_hot(Y, V)) / n", "softmax over dim 0 (the batch); "
                        "each row is normalised over its V characters: dim 1"),
                Mistake("-F.one_hot(Y, V) / n", "only the -one_hot term: the normaliser's softmax is missing "
                        "(that is dlogprobs, not dlogits)"),
                Mistake("F.softmax(logits, 1)", "the softmax alone: the -1 at each target (the one-hot) and "
                        "the 1/n of the mean are both missing"),
                Mistake("(logits.exp() - F.one_hot(Y, V)) / n", "exp(logits) without dividing by its row "
                        "sum: softmax is normalised"),
            )),
        Part("terms", "what does each term contribute?", (
            "A positive gradient makes gradient descent lower that logit; a negative one raises it.",
            "softmax_j > 0 for every j; -one_hot is -1 at the target only.",
            "(a): every logit is pushed down by its probability, the target pulled up by 1; the target moves "
            "by 1 - p and it all stops when p -> 1.",
        ), ("a",), choices=(
            Choice("a", "softmax pushes every logit down in proportion to its probability; -one_hot pulls "
                   "the target's logit up by 1; so the target rises by 1 - p, the others fall, until p -> 1",
                   right=True),
            Choice("b", "softmax pulls the target's logit up, -one_hot pushes the other logits down",
                   why="swapped: the softmax term is positive everywhere (descent lowers every logit by its "
                   "probability), the -one_hot is negative at the target only (descent raises it)"),
            Choice("c", "only the target's logit gets a gradient; the others are zero",
                   why="that is dlogprobs (sparse); dlogits is dense: every logit with probability > 0 is "
                   "pushed down"),
            Choice("d", "the softmax term is the prediction, the one-hot a regulariser that averages out",
                   why="both are the exact gradient: the softmax term comes from the normaliser log sum exp, "
                   "the -one_hot from the picked logit; neither averages out"),
        )),
        Part("rowsum", "each row of dlogits sums to:", (
            "Add up one row: the softmax part and the one-hot part.",
            "A softmax row sums to 1; a one-hot row sums to 1.",
            "1 - 1 = 0: what the target gains the others lose.",
        ), ("0", "0.0", "1 - 1", "0/n"), number=NumberForm(0.0, atol=1e-9, names={"n": 32}),
            mistakes=(
                Mistake(1.0, "a softmax row sums to 1, but the one-hot subtracts 1 in every row"),
                Mistake(-1.0, "the one-hot row sums to -1, and the softmax row adds 1 back"),
                Mistake(1 / 32, "1/n? the row of softmax - one_hot sums to 0, and so does its n-th"),
            )),
    ),
    "Per row, loss_i = -log softmax(z)[y] = -z_y + log sum_j exp(z_j). The first term gives -1 at the "
    "target (the one-hot), the log-sum-exp gives exp(z_j) / sum exp = softmax_j; the mean over n rows "
    "divides by n: dlogits = (F.softmax(logits, 1) - F.one_hot(Y, V)) / n. Gradient descent lowers every "
    "logit in proportion to its probability (the softmax) and raises the target by 1 (the one-hot); the "
    "target's net is 1 - p, so the push fades as the model gets the row right. Each row sums to 1 - 1 = 0: "
    "the pull up and the push down balance, like forces (the lecture's picture of dlogits).",
)


# ---------------------------------------------------------------------------- Q6 embedding accumulation
TOKEN = 9  # 'i': the token the probes repeat
REPEATS = (10, 3, 1)


def _accumulation_probes() -> list[Probe]:
    out = []
    for k, (reps, (N, T, E, V)) in enumerate(zip(REPEATS, ((32, 3, 10, 27), (8, 3, 4, 11), (6, 2, 3, 11)))):
        g = _gen(60 + k)
        others = torch.tensor([v for v in range(V) if v != TOKEN])
        Xb = others[torch.randint(0, V - 1, (N * T,), generator=g)]  # (N*T,) without the token
        Xb[torch.randperm(N * T, generator=g)[:reps]] = TOKEN
        Xb = Xb.view(N, T)  # (N, T)
        C = torch.randn((V, E), generator=g, dtype=torch.float64)
        demb = torch.randn((N, T, E), generator=g, dtype=torch.float64) / N  # the upstream, (N, T, E)
        ref = _grad_of(C, lambda c, Xb=Xb: c[Xb], demb)[TOKEN]  # (E,) autograd's dC[t]
        out.append(Probe(f"a batch where token t = {TOKEN} appears {reps} time{'s' if reps > 1 else ''}",
                         {"demb": demb, "Xb": Xb, "t": TOKEN, "C": C}, ref, {"k": reps}))
    return out


ACCUMULATION = Question(
    6, "accumulation", "Embedding accumulation",
    "a token used 10 times against one used once: how dC's rows compare (a choice, a number, an expression)",
    "emb = C[Xb]: if a token appears 10 times in a batch, how does its embedding's update (its row of dC) "
    "compare with that of a token that appears once?",
    (
        Part("compare", "the row of a token used 10 times is:", (
            "emb = C[Xb] uses row C[t] once for every position where Xb == t.",
            "A tensor used several times gets the sum of the gradients of all its uses.",
            "(a): the 10 contributions are added (index_add_, or +=), never overwritten or averaged.",
        ), ("a", "sum"), choices=(
            Choice("a", "the sum of its 10 contributions (one per use), about 10x one use when they agree; "
                   "the other token's row is its single contribution", right=True, aliases=("sum",)),
            Choice("b", "the same as a token used once: an embedding row is one parameter, updated once",
                   why="it is one parameter used 10 times: each use adds its own term to the gradient"),
            Choice("c", "the average of its 10 contributions",
                   why="averaging divides by 10 too often: the loss's 1/n is already inside each demb row, "
                   "and every use adds its whole contribution", aliases=("mean", "average")),
            Choice("d", "only its last use counts",
                   why="that is what dC[Xb] = demb does, a bug: each write overwrites the one before; the "
                   "gradient adds all 10 (index_add_)", aliases=("last",)),
        )),
        Part("times", "if the 10 contributions were all the same vector g, its row would be how many g?", (
            "How many times is C[t] used?",
            "Each of the 10 uses adds g.",
            "10",
        ), ("10", "10.0", "5*2"), number=NumberForm(10.0),
            mistakes=(
                Mistake(1.0, "1 g is what overwriting leaves (dC[Xb] = demb): the other 9 uses are lost"),
                Mistake(0.1, "1/10 is the mean; each use adds its whole g"),
            )),
        Part("row", "dC[t], from demb (N, T, E), Xb (N, T) and t =", (
            "Which positions (i, j) of demb belong to token t?",
            "The positions where Xb == t: demb[Xb == t] is one row per use, (number of uses, E).",
            "demb[Xb == t].sum(0): add the contributions of every use.",
        ), ("demb[Xb == t].sum(0)", "demb[Xb == t].sum(dim=0)",
            "(demb * (Xb == t).unsqueeze(-1)).sum((0, 1))",
            "torch.zeros_like(C).index_add(0, Xb.view(-1), demb.view(-1, demb.shape[-1]))[t]",
            "torch.zeros_like(C).index_add_(0, Xb.reshape(-1), demb.reshape(-1, C.shape[1]))[t]",
            "(F.one_hot(Xb, C.shape[0])[..., t, None] * demb).sum((0, 1))"),
            expression=ExpressionForm("dC[t]", {"demb": "(N, T, E) the upstream", "Xb": "(N, T) the tokens",
                                                "t": "the token", "C": "(V, E) the embedding table"},
                                      _accumulation_probes),
            mistakes=(
                Mistake("demb[Xb == t][-1]", "one contribution, the last use's: what dC[Xb] = demb leaves "
                        "when a row repeats (each write overwrites the one before); add all of them"),
                Mistake("demb[Xb == t][0]", "one contribution, the first use's; a row used several times "
                        "gets all of them added"),
                Mistake("demb[Xb == t].mean(0)", "the mean of its contributions: too small by the count; "
                        "every use adds its whole contribution"),
                Mistake("demb.sum((0, 1))", "the sum over every position, all tokens: only the positions "
                        "where Xb == t belong to token t"),
                Mistake("demb[Xb == t]", "these are the contributions themselves, one row per use: add them "
                        "(.sum(0))"),
                Mistake("C[t]", "C[t] is the embedding row itself, a forward value; its gradient is made "
                        "of demb, the upstream at the positions that use it"),
                Mistake("demb.view(-1, demb.shape[-1])[t]", "demb is indexed by position, not by token: this "
                        "is the t-th position's contribution; token t's are where Xb == t"),
            )),
    ),
    "emb = C[Xb] uses row C[t] once per position where Xb == t, and a tensor used several times gets the "
    "sum of its uses' gradients: dC[t] = demb[Xb == t].sum(0). A token used 10 times gets 10 terms (about "
    "10x one use when they point the same way), a token used once gets one. In code: "
    "dC = torch.zeros_like(C); dC.index_add_(0, Xb.view(-1), demb.view(-1, n_embd)) (the lecture's loop does "
    "dC[ix] += demb[k, j]). "
    "dC[Xb] = demb would overwrite: a repeated token keeps one of its 10 contributions and loses the rest.",
)


QUESTIONS: dict[str, Question] = {q.key: q for q in (ROUTING, SPARSE, DUALITY, SATURATION, CROSS_ENTROPY,
                                                     ACCUMULATION)}


def find(name: object) -> Question | None:
    """The question called `name`: 4, "4", "q4" or "saturation"."""
    key = str(name).strip().lower()
    for q in QUESTIONS.values():
        if key in (str(q.number), q.key, q.slug):
            return q
    return None


def get(name: object) -> Question:
    q = find(name)
    if q is None:
        raise ValueError(f"no question {str(name)!r:.40}; there are "
                         f"{', '.join(f'{q.key} ({q.slug})' for q in QUESTIONS.values())}")
    return q
