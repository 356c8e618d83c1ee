"""Checkpoints: tensors in safetensors (never pickle: loading runs no code) plus a JSON sidecar with
the model's spec (its layers as JSON), the configs, vocabulary, step and versions. Writes are
atomic: the tensors go to a new file, then meta.json is replaced in one rename and names that
file, so a run killed at any moment leaves a complete, consistent checkpoint (the previous one or
the new one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from handgrad import __version__
from handgrad.data import Vocab
from handgrad.layers import SpecError, from_spec, set_tensor
from handgrad.models import ModelConfig, layers_for
from handgrad.train import TrainConfig, TrainState

FORMAT = "handgrad-checkpoint"
FORMAT_VERSION = 2
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line for the user."""


@dataclass
class Checkpoint:
    model_config: ModelConfig | None  # None for a model built in the user's own code
    train_config: TrainConfig
    vocab: Vocab
    data_path: str | None  # the training data file (None: the bundled names.txt)
    state: TrainState
    inference: dict[str, Tensor] | None  # batchnorm statistics for inference, once training has finished
    results: dict  # final losses etc. (empty until training has finished)
    block_size: int  # context length the model reads

    def inference_model(self):
        """The model with its inference statistics (calibrated or running) in place of the running ones."""
        from handgrad.models import with_buffers

        return with_buffers(self.state.model, self.inference or {})


# ---------------------------------------------------------------------------- writing
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save(directory: str | Path, ckpt: Checkpoint) -> Path:
    """Save atomically into `directory` (created if needed). Returns the meta.json path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    s = ckpt.state
    tensors = {f"param.{name}": t.contiguous() for name, t in s.model.params().items()}
    tensors.update({f"buffer.{name}": t.contiguous() for name, t in s.model.buffers().items()})
    if ckpt.inference is not None:
        tensors.update({f"inference.{name}": t.contiguous() for name, t in ckpt.inference.items()})
    tensors["rng_state"] = s.generator.get_state()
    tensors["losses"] = s.losses
    blob = st_save(tensors)
    name = f"model-{s.step:09d}.safetensors"
    atomic_write_bytes(d / name, blob)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tensors_file": name, "sha256": hashlib.sha256(blob).hexdigest(),
        "step": s.step,
        "model": s.model.spec(),
        "model_config": None if ckpt.model_config is None else dataclasses.asdict(ckpt.model_config),
        "block_size": ckpt.block_size,
        "train_config": dataclasses.asdict(ckpt.train_config),
        "vocab": list(ckpt.vocab.itos),
        "data_path": ckpt.data_path,
        "finished": bool(ckpt.results),
        "results": ckpt.results,
        "versions": {"handgrad": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    atomic_write_bytes(d / META, (json.dumps(meta, indent=2) + "\n").encode())
    for old in d.glob("model-*.safetensors"):  # only after meta.json names the new file
        if old.name != name:
            old.unlink(missing_ok=True)
    return d / META


# ---------------------------------------------------------------------------- reading
def _config(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} fields {sorted(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid {cls.__name__}: {e}") from None


def load(directory: str | Path, layer_types: dict[str, type] | None = None) -> Checkpoint:
    """Load and validate a checkpoint directory; raises CheckpointError with a one-line reason.
    The model is rebuilt from its JSON spec with the built-in layer classes, plus `layer_types`
    ({"Name": Class}) for layers of the user's own: nothing named in the file is imported or run."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    meta_path = d / META
    if not meta_path.is_file():
        raise CheckpointError(f"{d}: not a handgrad checkpoint (no {META})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: truncated or corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a handgrad checkpoint (format is not {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('format_version')} is not supported "
                              f"(this handgrad reads version {FORMAT_VERSION})")
    try:
        mvals = meta["model_config"]
        mcfg = None if mvals is None else _config(ModelConfig, mvals, str(meta_path))
        tcfg = _config(TrainConfig, meta["train_config"], str(meta_path))
        vocab = Vocab(tuple(meta["vocab"]))
        tensors_path = d / meta["tensors_file"]
        step = int(meta["step"])
        block_size = int(meta["block_size"])
        model = from_spec(meta["model"], tcfg.torch_dtype, layer_types)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: missing or malformed field {e}") from None
    except SpecError as e:
        raise CheckpointError(f"{meta_path}: model: {e}") from None
    if mcfg is not None and len(vocab) != mcfg.vocab_size:
        raise CheckpointError(f"{meta_path}: vocabulary has {len(vocab)} characters but vocab_size "
                              f"is {mcfg.vocab_size}")
    if mcfg is not None and layers_for(mcfg).spec() != model.spec():
        raise CheckpointError(f"{meta_path}: model_config ({mcfg.name}) does not describe the stored "
                              "model spec; one of the two was edited")
    try:
        blob = tensors_path.read_bytes()
    except OSError:
        raise CheckpointError(f"{tensors_path}: missing (meta.json names it)") from None
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{tensors_path}: truncated or corrupt ({len(blob)} bytes, sha256 "
                              "does not match meta.json)")
    try:
        t = st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{tensors_path}: not a valid safetensors file ({e})") from None

    def take(prefix: str, expected: dict[str, Tensor], required: bool) -> dict[str, Tensor] | None:
        """The tensors `prefix.NAME` for every NAME of `expected`, checked against its shape and dtype."""
        if not required and not any(k.startswith(prefix + ".") for k in t):
            return None
        out = {}
        for name, like in expected.items():
            key = f"{prefix}.{name}"
            if key not in t:
                raise CheckpointError(f"{tensors_path}: tensor {key} is missing")
            if t[key].shape != like.shape:
                raise CheckpointError(f"{tensors_path}: tensor {key} has shape {tuple(t[key].shape)}, "
                                      f"the model expects {tuple(like.shape)}")
            if t[key].dtype != like.dtype:
                raise CheckpointError(f"{tensors_path}: tensor {key} is {t[key].dtype}, "
                                      f"expected {like.dtype}")
            out[name] = t[key]
        return out

    stored = {**take("param", model.params(), True), **take("buffer", model.buffers(), True)}
    for name, tensor in stored.items():
        set_tensor(model, name, tensor)
    inference = take("inference", model.buffers(), False)
    if "rng_state" not in t or "losses" not in t:
        raise CheckpointError(f"{tensors_path}: incomplete (rng_state or losses missing)")
    gen = torch.Generator()
    try:
        gen.set_state(t["rng_state"])
    except RuntimeError as e:
        raise CheckpointError(f"{tensors_path}: invalid RNG state ({e})") from None
    state = TrainState(model, step, gen, t["losses"])
    return Checkpoint(mcfg, tcfg, vocab, meta.get("data_path"), state, inference,
                      meta.get("results") or {}, block_size)
