"""A replica of makemore.py's training run in plain PyTorch (torch.nn modules, autograd,
torch.optim.AdamW, torch.utils.data's DataLoader and RandomSampler), written for the tests from what
makemore.py (karpathy/makemore, MIT) does: its six models, its data (CharDataset), its loop (a global
generator seeded once, evaluate() every `every` steps on 10 shuffled batches of 100, print_samples()
every 200 steps with torch.multinomial). handgrad's makemore_rng runs are compared with it; nothing in
handgrad imports it. Checking code: autograd is allowed here."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler


class Words(Dataset):
    """makemore's CharDataset: x = [0, c1 .. cL, 0 ...], y = [c1 .. cL, 0, -1 ...], block_size each."""

    def __init__(self, words: list[str], chars: list[str], block_size: int):
        self.words, self.stoi, self.T = words, {c: i + 1 for i, c in enumerate(chars)}, block_size

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i):
        ix = torch.tensor([self.stoi[c] for c in self.words[i]], dtype=torch.long)
        x = torch.zeros(self.T, dtype=torch.long)
        y = torch.zeros(self.T, dtype=torch.long)
        x[1:1 + len(ix)] = ix
        y[:len(ix)] = ix
        y[len(ix) + 1:] = -1
        return x, y


class Bigram(nn.Module):
    def __init__(self, V, T, E, H, n_head, n_layer):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros((V, V)))

    def forward(self, idx):
        return self.logits[idx]


class BoW(nn.Module):
    def __init__(self, V, T, E, H, n_head, n_layer):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, E), nn.Embedding(T, E)
        self.c_fc, self.c_proj = nn.Linear(E, H), nn.Linear(H, E)
        self.lm_head = nn.Linear(E, V)
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, T, T))

    def forward(self, idx):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t).unsqueeze(0))
        att = F.softmax(torch.zeros((b, t, t)).masked_fill(self.bias[:, :t, :t] == 0, float("-inf")), dim=-1)
        x = x + att @ x
        x = x + self.c_proj(torch.tanh(self.c_fc(x)))
        return self.lm_head(x)


class Bengio(nn.Module):
    def __init__(self, V, T, E, H, n_head, n_layer):
        super().__init__()
        self.V, self.T = V, T
        self.wte = nn.Embedding(V + 1, E)
        self.mlp = nn.Sequential(nn.Linear(T * E, H), nn.Tanh(), nn.Linear(H, V))

    def forward(self, idx):
        embs = []
        for _ in range(self.T):
            embs.append(self.wte(idx))
            idx = torch.roll(idx, 1, 1)
            idx[:, 0] = self.V  # the blank before the start
        return self.mlp(torch.cat(embs, -1))


class Cell(nn.Module):
    def __init__(self, kind, E, H):
        super().__init__()
        self.kind = kind
        if kind == "rnn":
            self.xh_to_h = nn.Linear(E + H, H)
        else:
            self.xh_to_z, self.xh_to_r, self.xh_to_hbar = (nn.Linear(E + H, H) for _ in range(3))

    def forward(self, xt, hprev):
        xh = torch.cat([xt, hprev], dim=1)
        if self.kind == "rnn":
            return torch.tanh(self.xh_to_h(xh))
        r = torch.sigmoid(self.xh_to_r(xh))
        hbar = torch.tanh(self.xh_to_hbar(torch.cat([xt, r * hprev], dim=1)))
        z = torch.sigmoid(self.xh_to_z(xh))
        return (1 - z) * hprev + z * hbar


def recurrent(kind):
    class RNN(nn.Module):
        def __init__(self, V, T, E, H, n_head, n_layer):
            super().__init__()
            self.start = nn.Parameter(torch.zeros(1, H))
            self.wte = nn.Embedding(V, E)
            self.cell = Cell(kind, E, H)
            self.lm_head = nn.Linear(H, V)

        def forward(self, idx):
            emb = self.wte(idx)
            h, hs = self.start.expand(idx.shape[0], -1), []
            for i in range(idx.shape[1]):
                h = self.cell(emb[:, i, :], h)
                hs.append(h)
            return self.lm_head(torch.stack(hs, 1))
    return RNN


class Attention(nn.Module):
    def __init__(self, T, E, n_head):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(E, 3 * E), nn.Linear(E, E), n_head
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


def gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Block(nn.Module):
    def __init__(self, T, E, n_head):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(E), Attention(T, E, n_head), nn.LayerNorm(E)
        self.c_fc, self.c_proj = nn.Linear(E, 4 * E), nn.Linear(4 * E, E)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(gelu(self.c_fc(self.ln_2(x))))


class Transformer(nn.Module):
    def __init__(self, V, T, E, H, n_head, n_layer):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, E), nn.Embedding(T, E)
        self.h = nn.ModuleList([Block(T, E, n_head) for _ in range(n_layer)])
        self.ln_f, self.lm_head = nn.LayerNorm(E), nn.Linear(E, V, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]).unsqueeze(0))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


MODELS = {"bigram": Bigram, "bow": BoW, "bengio": Bengio, "rnn": recurrent("rnn"), "gru": recurrent("gru"),
          "transformer": Transformer}


def _loss(model, X, Y):
    logits = model(X)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=-1)


@torch.inference_mode()
def evaluate(model, dataset, batch_size=100, max_batches=10) -> float:
    losses = []
    for i, (X, Y) in enumerate(DataLoader(dataset, shuffle=True, batch_size=batch_size, num_workers=0)):
        losses.append(_loss(model, X, Y).item())
        if i >= max_batches - 1:
            break
    return sum(losses) / len(losses)


@torch.no_grad()
def print_samples(model, T, num=10) -> None:
    """makemore's samples (not printed here: only their draws from the global generator matter)."""
    idx = torch.zeros(num, 1, dtype=torch.long)
    for _ in range(T - 1):
        probs = F.softmax(model(idx[:, -T:])[:, -1, :], dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)


def run(name: str, words: list[str], steps: int, every: int = 500, seed: int = 3407, block_size: int = 16,
        n_embd: int = 64, n_embd2: int = 64, n_head: int = 4, n_layer: int = 4, batch_size: int = 32):
    """makemore.py's run: (model, per-step training losses, [(step index, train, test)] evaluations,
    the first 5 batches (X, Y)). The global generator is restored afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        chars = sorted(set("".join(words)))
        n_test = min(1000, int(len(words) * 0.1))
        rp = torch.randperm(len(words)).tolist()
        train = Words([words[i] for i in rp[:-n_test]], chars, block_size)
        test = Words([words[i] for i in rp[-n_test:]], chars, block_size)
        model = MODELS[name](len(chars) + 1, block_size, n_embd, n_embd2, n_head, n_layer)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8)
        sampler = RandomSampler(train, replacement=True, num_samples=int(1e10))
        batches = iter(DataLoader(train, sampler=sampler, batch_size=batch_size, num_workers=0))
        losses, evals, first = [], [], []
        for step in range(steps):
            X, Y = next(batches)
            if step < 5:
                first.append((X, Y))
            loss = _loss(model, X, Y)
            model.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step > 0 and step % every == 0:
                evals.append((step, evaluate(model, train), evaluate(model, test)))
            if step > 0 and step % 200 == 0:
                print_samples(model, block_size)
    return model, losses, evals, first
