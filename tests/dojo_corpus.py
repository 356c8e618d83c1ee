"""Two corpora the dojo is held to, as data: realistic mistakes that its catalogue does not list (each
typed into a reference file or into the notebook of tests/dojo_notebook.py), and unusual but right solutions. Each
mistake: (id, item, "file" or "notebook", edits of the reference as (old, new), the rows that must be
wrong, the first being the mistake's own row, whose line is the first line of the last `new`).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------- uncatalogued mistakes
EX1 = [
    ("wrong-upstream-dembcat", [("dembcat = dhprebn @ W1.T", "dembcat = dhpreact @ W1.T")], ["dembcat"]),
    ("dropped-parens-tanh", [("dhpreact = (1.0 - h**2) * dh", "dhpreact = 1.0 - h**2 * dh")], ["dhpreact"]),
    ("tanh-squared-wrong", [("dhpreact = (1.0 - h**2) * dh", "dhpreact = (1.0 - h)**2 * dh")], ["dhpreact"]),
    ("exponent-sign", [("(bnvar + 1e-5) ** -1.5", "(bnvar + 1e-5) ** 1.5")], ["dbnvar"]),
    (
        "product-rule-factor",
        [("dcounts = counts_sum_inv * dprobs", "dcounts = counts_sum * dprobs")],
        ["dcounts"],
    ),
    (
        "index-whole-columns",
        [("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[:, Yb] = -1.0 / n")],
        ["dlogprobs"],
    ),
    ("sum-over-everything", [("db2 = dlogits.sum(0)", "db2 = dlogits.sum()")], ["db2"]),
    ("bessel-plus-one", [("dbndiff2 = (1.0 / (n - 1))", "dbndiff2 = (1.0 / (n + 1))")], ["dbndiff2"]),
    ("wrong-upstream-dW1", [("dW1 = embcat.T @ dhprebn", "dW1 = embcat.T @ dhpreact")], ["dW1"]),
    (
        "square-for-diff",
        [("dbnvar_inv = (bndiff * dbnraw)", "dbnvar_inv = (bndiff2 * dbnraw)")],
        ["dbnvar_inv"],
    ),
    ("power-minus-3", [("(-counts_sum**-2)", "(-counts_sum**-3)")], ["dcounts_sum"]),
    (
        "exp-local-wrong-var",
        [("dnorm_logits = counts * dcounts", "dnorm_logits = counts_sum_inv * dcounts")],
        ["dnorm_logits"],
    ),
    ("dh-from-dnorm_logits", [("dh = dlogits @ W2.T", "dh = dnorm_logits @ W2.T")], ["dh"]),
    ("bngain-with-bndiff", [("dbngain = (bnraw * dhpreact)", "dbngain = (bndiff * dhpreact)")], ["dbngain"]),
    ("bndiff-with-bnvar", [("dbndiff = bnvar_inv * dbnraw", "dbndiff = bnvar * dbnraw")], ["dbndiff"]),
    (
        "square-branch-bnraw",
        [("dbndiff += (2 * bndiff) * dbndiff2", "dbndiff += (2 * bnraw) * dbndiff2")],
        ["dbndiff"],
    ),
    ("dC-from-dembcat", [("dC[ix] += demb[k, j]", "dC[ix] += dembcat[k, j]")], ["dC"]),
    ("dW2-at-input", [("dW2 = h.T @ dlogits", "dW2 = hpreact.T @ dlogits")], ["dW2"]),
    (
        "log-over-counts",
        [("dprobs = (1.0 / probs) * dlogprobs", "dprobs = (1.0 / counts) * dlogprobs")],
        ["dprobs"],
    ),
    ("max-from-dcounts", [("dlogit_maxes = (-dnorm_logits)", "dlogit_maxes = (-dcounts)")], ["dlogit_maxes"]),
    ("hard-coded-31", [("dbndiff2 = (1.0 / (n - 1))", "dbndiff2 = (1.0 / 31)")], ["dbndiff2"]),
    (
        "bias-from-dh",
        [("dbnbias = dhpreact.sum(0, keepdim=True)", "dbnbias = dh.sum(0, keepdim=True)")],
        ["dbnbias"],
    ),
    ("dlogits-from-dcounts", [("dlogits = dnorm_logits.clone()", "dlogits = dcounts.clone()")], ["dlogits"]),
    (
        "sum-inv-with-probs",
        [("dcounts_sum_inv = (counts * dprobs)", "dcounts_sum_inv = (probs * dprobs)")],
        ["dcounts_sum_inv"],
    ),
]

# typed into the notebook's exercise 1 cell (its own spelling and forms, unlike the reference file's)
NB1 = [
    ("nb-wrong-upstream", [("dembcat = dhprebn @ W1.T", "dembcat = dhpreact @ W1.T")], ["dembcat"]),
    ("nb-dropped-parens", [("dhpreact = (1 - h**2) * dh", "dhpreact = 1 - h**2 * dh")], ["dhpreact"]),
    ("nb-index-columns", [("dlogprobs[range(n), Yb] = -1/n", "dlogprobs[:, Yb] = -1/n")], ["dlogprobs"]),
    ("nb-exponent-sign", [("(bnvar + 1e-5)**-1.5", "(bnvar + 1e-5)**1.5")], ["dbnvar"]),
    ("nb-bessel-minus-2", [("dbndiff2 = 1/(n-1) *", "dbndiff2 = 1/(n-2) *")], ["dbndiff2"]),
    ("nb-sum-everything", [("db2 = dlogits.sum(0)", "db2 = dlogits.sum()")], ["db2"]),
    (
        "nb-power-of-counts",
        [("dcounts_sum = -counts_sum**-2", "dcounts_sum = -counts**-2")],
        ["dcounts_sum"],
    ),
    ("nb-bias-for-gain", [("dbnraw = dhpreact * bngain", "dbnraw = dhpreact * bnbias")], ["dbnraw"]),
]

EX2 = [
    ("ce-index-columns", "file", [("dlogits[range(n), Yb] -= 1", "dlogits[:, Yb] -= 1")], ["dlogits"]),
    ("ce-vocab-for-n", "file", [("dlogits /= n", "dlogits /= vocab_size")], ["dlogits"]),
    (
        "ce-one-over-n-twice",
        "file",
        [("dlogits[range(n), Yb] -= 1", "dlogits[range(n), Yb] -= 1 / n")],
        ["dlogits"],
    ),
    (
        "ce-nb-minus-two",
        "notebook",
        [("dlogits[range(n), Yb] -= 1", "dlogits[range(n), Yb] -= 2")],
        ["dlogits"],
    ),
    ("ce-nb-hidden-for-n", "notebook", [("dlogits /= n", "dlogits /= n_hidden")], ["dlogits"]),
]

EX3 = [
    ("bn-bare-number", "file", [("n / (n - 1) * bnraw", "1.06667 * bnraw")], ["dhprebn"]),
    (
        "bn-term-without-n",
        "file",
        [("n * dhpreact - dhpreact.sum(0)", "dhpreact - dhpreact.sum(0)")],
        ["dhprebn"],
    ),
    (
        "bn-one-term-bndiff",
        "file",
        [("(dhpreact * bnraw).sum(0)", "(dhpreact * bndiff).sum(0)")],
        ["dhprebn"],
    ),
    ("bn-var-for-inv", "file", [("bngain * bnvar_inv / n", "bngain * bnvar / n")], ["dhprebn"]),
    ("bn-nb-plus-one", "notebook", [("n/(n-1) * bnraw", "n/(n+1) * bnraw")], ["dhprebn"]),
]

LOSS = ["loss curve", "loss reached"]
EX4 = [
    (
        "tr-wrong-upstream",
        "file",
        [("dembcat = dhprebn @ W1.T", "dembcat = dhpreact @ W1.T")],
        ["dembcat", LOSS[0]],
    ),
    ("tr-db1-from-dhpreact", "file", [("db1 = dhprebn.sum(0)", "db1 = dhpreact.sum(0)")], ["db1"]),
    ("tr-index-columns", "file", [("dlogits[range(n), Yb] -= 1", "dlogits[:, Yb] -= 1")], ["dlogits"] + LOSS),
    (
        "tr-nb-dropped-parens",
        "notebook",
        [("dhpreact = (1 - h**2) * dh", "dhpreact = 1 - h**2 * dh")],
        ["dhpreact"] + LOSS,
    ),
    (
        "tr-nb-dW2-at-input",
        "notebook",
        [("dW2 = h.T @ dlogits", "dW2 = hpreact.T @ dlogits")],
        ["dW2"] + LOSS,
    ),
]

CHALLENGES = [
    ("lt-tanh-squared", "linear-tanh", [("dz = (1 - a**2) * da", "dz = (1 - a)**2 * da")], ["dz"]),
    ("lt-dropped-parens", "linear-tanh", [("dz = (1 - a**2) * da", "dz = 1 - a**2 * da")], ["dz"]),
    ("lt-z-for-da", "linear-tanh", [("dz = (1 - a**2) * da", "dz = (1 - a**2) * z")], ["dz"]),
    (
        "ce-dropped-parens",
        "cross-entropy",
        [
            (
                "dloss * (F.softmax(logits, 1) - F.one_hot(Y, logits.shape[1]).to(logits.dtype)) / n",
                "dloss * F.softmax(logits, 1) - F.one_hot(Y, logits.shape[1]).to(logits.dtype) / n",
            )
        ],
        ["dlogits"],
    ),
    (
        "ce-classes-for-rows",
        "cross-entropy",
        [(".to(logits.dtype)) / n", ".to(logits.dtype)) / logits.shape[1]")],
        ["dlogits"],
    ),
    ("ce-plus-one-hot", "cross-entropy", [("1) - F.one_hot", "1) + F.one_hot")], ["dlogits"]),
    (
        "bnc-dgamma-var-inv",
        "batchnorm",
        [("dgamma = (xhat * dout).sum(0)", "dgamma = (var_inv * dout).sum(0)")],
        ["dgamma", "dx"],
    ),  # the learner's dx reads their own dgamma: a function is not fed row by row
    ("bnc-dx-dbeta-for-dgamma", "batchnorm", [("xhat * dgamma)", "xhat * dbeta)")], ["dx"]),
    (
        "bnc-exponent-sign",
        "batchnorm",
        [("self.var_inv = (xvar + self.eps) ** -0.5", "self.var_inv = (xvar + self.eps) ** 0.5")],
        ["out(train)", "out(eval)"],
    ),
    (
        "gc-any-for-all",
        "gradcheck",
        [("numeric.abs()).all())", "numeric.abs()).any())")],
        ["rejects one element", "rejects transposed"],
    ),
    (
        "gc-times-for-plus",
        "gradcheck",
        [("<= atol + rtol", "<= atol * rtol")],
        ["accepts right (sin)", "accepts right (matrix)"],
    ),
    (
        "emb-index-transposed",
        "embedding",
        [("dC.index_add_(0, X.reshape(-1)", "dC.index_add_(0, X.T.reshape(-1)")],
        ["dC"],
    ),
    (
        "emb-ones-like",
        "embedding",
        [("dC = torch.zeros_like(C)  # (V, E)", "dC = torch.ones_like(C)  # (V, E)")],
        ["dC"],
    ),
    (
        "ck-weight-index-recompute",
        "checkpoint",
        [("hs.append(block_forward(hs[-1], Ws[l]))", "hs.append(block_forward(hs[-1], Ws[l - s]))")],
        ["dx", "dW"],
    ),
    (
        "ck-weight-index-backward",
        "checkpoint",
        [("hs[l - s], Ws[l], hs[l - s + 1]", "hs[l - s], Ws[l - s], hs[l - s + 1]")],
        ["dx", "dW"],
    ),
    (
        "lt-nb-dropped-parens",
        "linear-tanh@notebook",
        [("dz = (1 - a**2) * da", "dz = 1 - a**2 * da")],
        ["dz"],
    ),
    # the makemore zoo's challenges (more of them in tests/test_dojo_zoo.py)
    ("ln-bias-for-weight", "layernorm", [("dxhat = weight * dout", "dxhat = bias * dout")], ["dxhat"]),
    (
        "at-y-for-dy",
        "attention",
        [("dv = att.transpose(-2, -1) @ dy", "dv = att.transpose(-2, -1) @ y")],
        ["dv"],
    ),
    (
        "rnn-z-for-dz",
        "rnn",
        [("dWhh = hprev.reshape(-1, H).T @ dz", "dWhh = hprev.reshape(-1, H).T @ z")],
        ["dWhh"],
    ),
]

# ---------------------------------------------------------------------------- unusual but right solutions
RIGHT_EX1 = [
    (
        "einsum-h-W2",
        [
            ("dh = dlogits @ W2.T", "dh = torch.einsum('nv,hv->nh', dlogits, W2)"),
            ("dW2 = h.T @ dlogits", "dW2 = torch.einsum('nh,nv->hv', h, dlogits)"),
        ],
    ),
    (
        "one-hot-logprobs",
        [
            (
                "dlogprobs = torch.zeros_like(logprobs)\ndlogprobs[range(n), Yb] = -1.0 / n",
                "dlogprobs = -F.one_hot(Yb, vocab_size) / n",
            )
        ],
    ),
    (
        "index-put-accumulate",
        [
            (
                "dC = torch.zeros_like(C)\nfor k in range(Xb.shape[0]):\n    for j in range(Xb.shape[1]):"
                "\n        ix = Xb[k, j]\n        dC[ix] += demb[k, j]",
                "dC = torch.zeros(vocab_size, n_embd)\n"
                "dC.index_put_((Xb.flatten(),), demb.reshape(-1, n_embd), accumulate=True)",
            )
        ],
    ),
    (
        "one-hot-matmul-dC",
        [
            (
                "dC = torch.zeros_like(C)\nfor k in range(Xb.shape[0]):\n    for j in range(Xb.shape[1]):"
                "\n        ix = Xb[k, j]\n        dC[ix] += demb[k, j]",
                "dC = F.one_hot(Xb.view(-1), vocab_size).type_as(demb).T @ demb.view(-1, n_embd)",
            )
        ],
    ),
    (
        "bnvar-from-inv-cubed",
        [
            (
                "dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvar_inv",
                "dbnvar = -0.5 * bnvar_inv**3 * dbnvar_inv",
            )
        ],
    ),
    (
        "expand-as",
        [
            (
                "dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(bndiff2) * dbnvar",
                "dbndiff2 = dbnvar.expand_as(bndiff2) / (n - 1)",
            )
        ],
    ),
    (
        "counts-sum-inv-squared",
        [
            (
                "dcounts_sum = (-counts_sum**-2) * dcounts_sum_inv",
                "dcounts_sum = -dcounts_sum_inv * counts_sum_inv**2",
            )
        ],
    ),
    (
        "argmax-index-add",
        [
            (
                "dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes",
                "dlogits[torch.arange(n), logits.argmax(1)] += dlogit_maxes.squeeze(1)",
            )
        ],
    ),
    ("ones-matmul-db1", [("db1 = dhprebn.sum(0)", "db1 = torch.ones(n) @ dhprebn")]),
    ("float32-eps-tensor", [("(bnvar + 1e-5) ** -1.5", "(bnvar + torch.tensor(1e-5)) ** -1.5")]),
    ("tanh-expanded", [("dhpreact = (1.0 - h**2) * dh", "dhpreact = dh - dh * h * h")]),
    ("helper-variable", [("dbnraw = bngain * dhpreact", "g = bngain\ndbnraw = g * dhpreact")]),
    (
        "loop-over-rows-dW2",
        [
            (
                "dW2 = h.T @ dlogits",
                "dW2 = torch.zeros_like(W2)\nfor i in range(n):\n    dW2 += torch.outer(h[i], dlogits[i])",
            )
        ],
    ),
    ("zeros-float32-dC", [("dC = torch.zeros_like(C)", "dC = torch.zeros((27, 10))")]),
    (
        "keepdim-everywhere",
        [
            ("db2 = dlogits.sum(0)", "db2 = dlogits.sum(0, keepdim=True)"),
            ("db1 = dhprebn.sum(0)", "db1 = dhprebn.sum(0, keepdim=True)"),
        ],
    ),
]
RIGHT_NB1 = [
    ("nb-einsum-W1", [("dW1 = embcat.T @ dhprebn", "dW1 = torch.einsum('ni,nj->ij', embcat, dhprebn)")]),
    (
        "nb-index-add",
        [
            (
                "for row, context in enumerate(Xb):\n    for pos, ch in enumerate(context):\n        dC[ch] += demb[row, pos]",
                "dC.index_add_(0, Xb.view(-1), demb.view(-1, n_embd))",
            )
        ],
    ),
    (
        "nb-one-hot-float",
        [
            (
                "dlogprobs = torch.zeros_like(logprobs)\ndlogprobs[range(n), Yb] = -1/n",
                "dlogprobs = -F.one_hot(Yb, num_classes=vocab_size).float() / n",
            )
        ],
    ),
]
RIGHT_OTHER = [  # (id, item, where, edits)
    (
        "ce-one-hot",
        "2",
        "file",
        [
            (
                "dlogits = F.softmax(logits, 1)\ndlogits[range(n), Yb] -= 1\ndlogits /= n",
                "dlogits = (F.softmax(logits, 1) - F.one_hot(Yb, vocab_size)) / n",
            )
        ],
    ),
    (
        "ce-exp-by-hand",
        "2",
        "file",
        [
            (
                "dlogits = F.softmax(logits, 1)",
                "e = (logits - logits.max(1, keepdim=True).values).exp()\n"
                "dlogits = e / e.sum(1, keepdim=True)",
            )
        ],
    ),
    (
        "ce-nb-torch-softmax",
        "2",
        "notebook",
        [("dlogits = F.softmax(logits, 1)", "dlogits = torch.softmax(logits, dim=-1)")],
    ),
    (
        "bn-mean-form",
        "3",
        "file",
        [
            (
                "dhprebn = bngain * bnvar_inv / n * (\n    n * dhpreact - dhpreact.sum(0) - n / (n - 1) * "
                "bnraw * (dhpreact * bnraw).sum(0)\n)",
                "dhprebn = bngain * bnvar_inv * (dhpreact - dhpreact.mean(0, keepdim=True) - bnraw * "
                "(dhpreact * bnraw).sum(0, keepdim=True) / (n - 1))",
            )
        ],
    ),
    (
        "bn-steps",
        "3",
        "file",
        [
            (
                "dhprebn = bngain * bnvar_inv / n * (\n    n * dhpreact - dhpreact.sum(0) - n / (n - 1) * "
                "bnraw * (dhpreact * bnraw).sum(0)\n)",
                "dbnraw = bngain * dhpreact\nterm = n * dbnraw - dbnraw.sum(0) - n / (n - 1) * bnraw * "
                "(dbnraw * bnraw).sum(0)\ndhprebn = bnvar_inv / n * term",
            )
        ],
    ),
    (
        "tr-loop-dC",
        "4",
        "file",
        [
            (
                "dC.index_add_(0, Xb.view(-1), demb.view(-1, n_embd))",
                "for k in range(n):\n        for j in range(block_size):\n"
                "            dC[Xb[k, j]] += demb[k, j]",
            )
        ],
    ),
    (
        "tr-einsum-dW1",
        "4",
        "file",
        [("dW1 = embcat.T @ dhprebn", "dW1 = torch.einsum('ni,nj->ij', embcat, dhprebn)")],
    ),
    ("lt-einsum", "linear-tanh", "file", [("dW = x.T @ dz", "dW = torch.einsum('nd,nh->dh', x, dz)")]),
    (
        "lt-ones-db",
        "linear-tanh",
        "file",
        [
            (
                "db = dz.sum(0)  # b is broadcast over the N rows",
                "db = torch.ones(dz.shape[0], dtype=dz.dtype) @ dz",
            )
        ],
    ),
    (
        "cec-log-softmax",
        "cross-entropy",
        "file",
        [("F.softmax(logits, 1)", "F.log_softmax(logits, 1).exp()")],
    ),
    (
        "emb-loop",
        "embedding",
        "file",
        [
            (
                "dC.index_add_(0, X.reshape(-1), demb.reshape(-1, C.shape[1]))  "
                "# accumulates repeated indices",
                "for i in range(X.shape[0]):\n        for t in range(X.shape[1]):\n"
                "            dC[X[i, t]] += demb[i, t]",
            )
        ],
    ),
    (
        "bnc-mean-form",
        "batchnorm",
        "file",
        [
            (
                "dx = self.gamma * var_inv / n * (n * dout - dbeta - n / (n - 1) * xhat * dgamma)",
                "dx = self.gamma * var_inv * (dout - dout.mean(0) - xhat * dgamma / (n - 1))",
            )
        ],
    ),
]
