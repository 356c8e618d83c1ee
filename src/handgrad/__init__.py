"""handgrad: train neural nets with hand-written gradients, and prove every gradient.
Starts from Karpathy's "Building makemore Part 4: Becoming a Backprop Ninja".

The public names below are imported on first use (PEP 562), so that `import handgrad` stays cheap:
the `handgrad` command (handgrad.__main__) installs its Ctrl-C handling before torch is imported.
"""

import importlib

__version__ = "0.2.0"

# name -> the module that defines it (a module's own name: the module itself)
_PUBLIC = {
    "ops": "ops",
    "check_backward": "check", "check_function": "functions", "check_op": "functions", "compare": "check",
    "run_lecture_check": "check",
    "DataError": "data", "Splits": "data", "Vocab": "data", "default_data_path": "data",
    "make_splits": "data", "read_words": "data",
    "BatchNorm1d": "layers", "Embedding": "layers", "FlattenConsecutive": "layers", "Layer": "layers",
    "Linear": "layers", "ReLU": "layers", "Sequential": "layers", "Tanh": "layers",
    "ModelConfig": "models", "build": "models", "evaluate": "models", "loss_and_grads": "models",
    "preset": "models", "sample": "models",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'handgrad' has no attribute {name!r}")
    module = importlib.import_module(f"handgrad.{_PUBLIC[name]}")
    value = module if _PUBLIC[name] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
