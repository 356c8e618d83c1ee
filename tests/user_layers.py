"""A user's own layer, written the way the README asks (forward/backward/params/buffers/spec, no
handgrad base class), shared by the tests of specs, training and checkpoints."""

import torch


class Scale:
    """out = x * s, one learnable scale per feature."""

    def __init__(self, dim: int, value: float = 0.8, dtype: torch.dtype = torch.float32):
        self.s = torch.full((dim,), value, dtype=dtype)

    def params(self):
        return {"s": self.s}

    def buffers(self):
        return {}

    def forward(self, x, training=True):
        return x * self.s, (x,)

    def backward(self, dout, cache):
        (x,) = cache
        return dout * self.s, {"s": (dout * x).reshape(-1, x.shape[-1]).sum(0)}

    def spec(self):
        return {"type": "Scale", "dim": self.s.shape[0]}
