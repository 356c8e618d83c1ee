"""Checkpoints: tensors in safetensors (never pickle: loading runs no code) plus a JSON sidecar with
the model's spec (its layers as JSON), the configs, vocabulary, step and versions. Writes are atomic
and never reuse a file name, so a run killed at any moment leaves a complete, consistent checkpoint
(the previous one or the new one). Reading treats every byte as untrusted: meta.json is checked
field by field against a schema, the model is rebuilt from its spec and every tensor is checked
against it, and only regular files inside the checkpoint's own directory are opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import secrets
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from handgrad import __version__, io, models
from handgrad.config import int_bounds
from handgrad.data import Vocab, vocab_problem
from handgrad.io import atomic_write_bytes
from handgrad.layers import Embedding, SpecError, from_spec, set_tensor
from handgrad.models import ModelConfig, layers_for, with_buffers
from handgrad.train import TrainConfig, TrainState, new_optimizer

FORMAT = "handgrad-checkpoint"
FORMAT_VERSION = 2
META = "meta.json"
TENSORS_RE = re.compile(r"model-[0-9]{1,13}(-[0-9a-f]{8,32})?\.safetensors")
HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_META_BYTES = 64 << 20
MAX_FILES = 64  # tensor files a meta.json may list as its run's own
READ_ATTEMPTS = 5  # a writer may replace the checkpoint between reading meta.json and its tensor file

LR_FIELDS = ("lr", "lr_decayed", "lr_decay_step")  # what a resumed run may change


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
    data_sha256: str | None = None  # data_fingerprint() of the training items (None: not recorded)
    lr_history: list[dict] = field(default_factory=list)  # [{"from_step", "lr", "lr_decayed",
    # "lr_decay_step"}]: the learning-rate settings in force from each step (a resume may change them)

    def inference_model(self):
        """The model with its inference statistics (calibrated or running) in place of the running ones."""
        return with_buffers(self.state.model, self.inference or {})


def data_fingerprint(items: list[str]) -> str:
    """sha256 of the items, one per line: the same data however the file was named or delivered
    (a path, a copy, stdin), and different data whatever its name."""
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


def lr_settings(tcfg: TrainConfig, from_step: int) -> dict:
    return {"from_step": from_step, **{k: getattr(tcfg, k) for k in LR_FIELDS}}


# ---------------------------------------------------------------------------- writing
def _tensors(ckpt: Checkpoint) -> dict[str, Tensor]:
    s = ckpt.state
    tensors = {f"param.{name}": t.contiguous() for name, t in s.model.params().items()}
    tensors.update({f"buffer.{name}": t.contiguous() for name, t in s.model.buffers().items()})
    if ckpt.inference is not None:
        tensors.update({f"inference.{name}": t.contiguous() for name, t in ckpt.inference.items()})
    if s.optimizer is not None:
        tensors.update({f"optim.{name}": t.contiguous() for name, t in s.optimizer.state().items()})
    tensors["rng_state"] = s.generator.get_state()
    tensors["losses"] = _losses(s.losses, ckpt.train_config.steps)
    return tensors


def _losses(losses: Tensor, steps: int) -> Tensor:
    """The per-step losses as exactly (steps,) float64, NaN beyond those recorded: a resumed run may
    have lowered or raised `steps` since the tensor was allocated."""
    out = torch.full((steps,), float("nan"), dtype=torch.float64)  # (steps,)
    n = min(steps, losses.shape[0])
    out[:n] = losses[:n]
    return out


def _json_safe(results: dict) -> dict:
    """Results as strict JSON: a non-finite loss becomes null (NaN is not JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}


def own_files(directory: Path) -> list[str]:
    """The tensor files that the checkpoint now in `directory` lists as written by its run (those
    still present), or [] where there is no readable handgrad meta.json."""
    try:
        meta = json.loads(io.read_inside(Path(directory), META, MAX_META_BYTES))
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return []
    listed = meta.get("files", [meta.get("tensors_file")])
    if not isinstance(listed, list):
        return []
    return [f for f in listed[-MAX_FILES:] if isinstance(f, str) and TENSORS_RE.fullmatch(f)
            and (Path(directory) / f).is_file()]


def save(directory: str | Path, ckpt: Checkpoint) -> Path:
    """Save into `directory` (created if needed) and return the meta.json path. The tensor file gets
    a name never used before (step + random suffix); meta.json is replaced in one rename and names
    it; only then are the run's previous tensor files deleted (those the old meta.json lists as the
    run's own; nothing else in the directory is touched). Before the tensor file is written its name
    is added to the old meta.json's list, so a kill in between leaves no unlisted file behind.
    Concurrent writers must be excluded by the caller (io.RunLock). Raises OSError."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    s = ckpt.state
    blob = st_save(_tensors(ckpt))
    name = f"model-{s.step:09d}-{secrets.token_hex(4)}.safetensors"
    previous = own_files(d)
    files = [*previous, name][-MAX_FILES:]
    try:
        old = json.loads(io.read_inside(d, META, MAX_META_BYTES))
    except (OSError, ValueError, RecursionError):
        old = None
    if isinstance(old, dict) and old.get("format") == FORMAT:  # announce the new file first
        atomic_write_bytes(d / META, (json.dumps({**old, "files": files}, indent=2) + "\n").encode())
    atomic_write_bytes(d / name, blob)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tensors_file": name, "sha256": hashlib.sha256(blob).hexdigest(), "files": files,
        "step": s.step,
        "model": s.model.spec(),
        "model_config": None if ckpt.model_config is None else dataclasses.asdict(ckpt.model_config),
        "block_size": ckpt.block_size,
        "train_config": dataclasses.asdict(ckpt.train_config),
        "lr_history": ckpt.lr_history or [lr_settings(ckpt.train_config, 0)],
        "vocab": list(ckpt.vocab.itos),
        "data_path": ckpt.data_path,
        "data_sha256": ckpt.data_sha256,
        "finished": bool(ckpt.results),
        "results": _json_safe(ckpt.results),
        "versions": {"handgrad": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    atomic_write_bytes(d / META, (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode())
    for old_name in previous:  # only after meta.json names the new file
        if old_name != name:
            io.remove_inside(d, old_name)
    return d / META


# ---------------------------------------------------------------------------- the schema of meta.json
Check = Callable[[object, str], object]  # (value, where) -> value, or raises CheckpointError


def _show(v) -> str:
    """A value from the file, for a message: repr (control characters escaped), truncated."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, expected: str, v) -> typing.NoReturn:
    raise CheckpointError(f"{where}: expected {expected}, got {_show(v)}")


def _int(lo: int, hi: int) -> Check:
    def check(v, where):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            _fail(where, f"an integer from {lo} to {hi}", v)
        return v
    return check


def _number(v, where):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        _fail(where, "a finite number", v)
    return v


def _bool(v, where):
    if not isinstance(v, bool):
        _fail(where, "true or false", v)
    return v


def _str(pattern: re.Pattern | None = None, max_len: int = 4096) -> Check:
    def check(v, where):
        if not isinstance(v, str) or len(v) > max_len or "\0" in v or (pattern and not pattern.fullmatch(v)):
            _fail(where, f"a string{' like ' + pattern.pattern if pattern else ''} of at most {max_len} "
                  "characters", v)
        return v
    return check


def _nullable(check: Check) -> Check:
    return lambda v, where: None if v is None else check(v, where)


def _object(v, where):
    if not isinstance(v, dict):
        _fail(where, "an object", v)
    return v


def _list(item: Check, lo: int, hi: int) -> Check:
    def check(v, where):
        if not isinstance(v, list) or not lo <= len(v) <= hi:
            _fail(where, f"a list of {lo} to {hi} entries", v)
        return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return check


def _mapping(value: Check, hi: int) -> Check:
    def check(v, where):
        if not isinstance(v, dict) or len(v) > hi:
            _fail(where, f"an object of at most {hi} entries", v)
        return {_str(max_len=64)(k, f"{where} key"): value(x, f"{where}.{k}") for k, x in v.items()}
    return check


def _scalar(v, where):
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, str):
        return _str(max_len=200)(v, where)
    return _number(v, where)


def _char(v, where):
    """A vocabulary entry: one printable character (no control, format or escape characters, which
    `sample` would print to the terminal)."""
    if not isinstance(v, str) or len(v) != 1 or not v.isprintable():
        _fail(where, "one printable character", v)
    return v


def _fields(cls) -> Check:
    """A frozen config dataclass from a JSON object: no unknown fields, each field of its annotated
    type (an integer within its rule's bounds, config.int_bounds), then the dataclass's own validation."""
    hints = typing.get_type_hints(cls)
    kinds = {int: None, float: _number, str: _str(max_len=100), bool: _bool}

    def check(v, where):
        _object(v, where)
        unknown = set(v) - set(hints)
        if unknown:
            raise CheckpointError(f"{where}: unknown {cls.__name__} fields {sorted(map(str, unknown))}"[:300])
        for name, x in v.items():
            kind = hints[name]
            if kind is int:
                _int(*int_bounds(cls, name))(x, f"{where}.{name}")
            else:
                kinds[kind](x, f"{where}.{name}")
        try:
            return cls(**v)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: invalid {cls.__name__}: {e}") from None
    return check


def _lr_entry(v, where):
    _object(v, where)
    if set(v) != {"from_step", *LR_FIELDS}:
        _fail(where, f"an object with the keys from_step, {', '.join(LR_FIELDS)}", v)
    _int(0, MAX_STEPS)(v["from_step"], f"{where}.from_step")
    for k in ("lr", "lr_decayed"):
        if not _number(v[k], f"{where}.{k}") > 0:
            _fail(f"{where}.{k}", "a positive number", v[k])
    _int(*int_bounds(TrainConfig, "lr_decay_step"))(v["lr_decay_step"], f"{where}.lr_decay_step")
    return v


MAX_STEPS = int_bounds(TrainConfig, "steps")[1]
MAX_VOCAB = int_bounds(ModelConfig, "vocab_size")[1]
# Every field of meta.json: its check, and whether it must be present (rules as data).
SCHEMA: dict[str, tuple[Check, bool]] = {
    "format": (_str(re.compile(re.escape(FORMAT))), True),
    "format_version": (_int(FORMAT_VERSION, FORMAT_VERSION), True),
    "tensors_file": (_str(TENSORS_RE), True),
    "sha256": (_str(HEX64), True),
    "files": (_list(_str(TENSORS_RE), 1, MAX_FILES), False),
    "step": (_int(0, MAX_STEPS), True),
    "model": (_object, True),
    "model_config": (_nullable(_fields(ModelConfig)), True),
    "block_size": (_int(*int_bounds(ModelConfig, "block_size")), True),
    "train_config": (_fields(TrainConfig), True),
    "lr_history": (_list(_lr_entry, 1, 10_000), False),
    "vocab": (_list(_char, 2, MAX_VOCAB), True),
    "data_path": (_nullable(_str()), True),
    "data_sha256": (_nullable(_str(HEX64)), False),
    "finished": (_bool, True),
    "results": (_mapping(_scalar, 64), True),
    "versions": (_mapping(_str(max_len=100), 16), False),
}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_meta(raw: bytes, where: str) -> dict:
    """meta.json's bytes -> its fields, each checked against SCHEMA (values converted: the configs
    become dataclasses). Raises CheckpointError naming the first bad field."""
    try:
        meta = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints, NaN
        raise CheckpointError(f"{where}: truncated or corrupt JSON ({str(e)[:100]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a handgrad checkpoint (format is not {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {_show(meta.get('format_version'))} is not "
                              f"supported (this handgrad reads version {FORMAT_VERSION})")
    unknown = sorted(set(meta) - set(SCHEMA))
    if unknown:
        raise CheckpointError(f"{where}: unknown field {_show(unknown[0])}")
    out = {}
    for name, (check, required) in SCHEMA.items():
        if name not in meta:
            if required:
                raise CheckpointError(f"{where}: field {name!r} is missing")
            continue
        out[name] = check(meta[name], f"{where}: field {name!r}")
    return out


# ---------------------------------------------------------------------------- reading
def _read_meta(d: Path) -> bytes:
    try:
        return io.read_inside(d, META, MAX_META_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{d}: not a handgrad checkpoint (no {META})") from None
    except io.UnsafeFileError as e:
        raise CheckpointError(str(e)) from None


def _consistent(meta: dict, where: str) -> None:
    """Cross-field rules: what one field says must agree with the others."""
    mcfg, tcfg, vocab = meta["model_config"], meta["train_config"], meta["vocab"]
    problem = vocab_problem(vocab)
    if problem is not None:
        raise CheckpointError(f"{where}: field 'vocab' {problem}")
    if mcfg is not None and len(vocab) != mcfg.vocab_size:
        raise CheckpointError(f"{where}: vocabulary has {len(vocab)} characters but vocab_size "
                              f"is {mcfg.vocab_size}")
    if mcfg is not None and mcfg.block_size != meta["block_size"]:
        raise CheckpointError(f"{where}: block_size {meta['block_size']} differs from model_config's "
                              f"{mcfg.block_size}")
    if meta["step"] > tcfg.steps:
        raise CheckpointError(f"{where}: step {meta['step']} is beyond train_config.steps {tcfg.steps}")
    if meta["tensors_file"] not in meta.get("files", [meta["tensors_file"]]):
        raise CheckpointError(f"{where}: field 'files' does not list the tensors_file")
    history = meta.get("lr_history")
    if history:
        starts = [h["from_step"] for h in history]
        if starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] > meta["step"]:
            raise CheckpointError(f"{where}: field 'lr_history' must start at step 0 and increase up to step "
                                  f"{meta['step']}")
        if any(history[-1][k] != getattr(tcfg, k) for k in LR_FIELDS):
            raise CheckpointError(f"{where}: the last lr_history entry differs from train_config")


def _embeddings(model) -> list:
    return [m for layer in getattr(model, "layers", [model]) for m in _embeddings_in(layer)]


def _embeddings_in(layer) -> list:
    if isinstance(layer, Embedding):
        return [layer]
    return [m for sub in getattr(layer, "layers", []) for m in _embeddings_in(sub)]


def _build(meta: dict, layer_types, where: str):
    """The model of the spec, built on the meta device (shapes only, no memory), checked against the
    model config, the vocabulary and the block size by a forward pass on the meta device."""
    tcfg, mcfg, V, T = meta["train_config"], meta["model_config"], len(meta["vocab"]), meta["block_size"]
    try:
        with torch.device("meta"):
            model = from_spec(meta["model"], tcfg.torch_dtype, layer_types)
            expected = None if mcfg is None else layers_for(mcfg, tcfg.torch_dtype).spec()
    except SpecError as e:
        raise CheckpointError(f"{where}: model: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: model: the spec is nested too deeply") from None
    if expected is not None and model.spec() != expected:
        raise CheckpointError(f"{where}: model_config ({mcfg.name}) does not describe the stored model spec; "
                              "one of the two was edited")
    for emb in _embeddings(model) if models.kind(mcfg) == "context" else []:  # Bengio's has V + 1 rows
        if emb.weight.shape[0] != V:
            raise CheckpointError(f"{where}: the model embeds {emb.weight.shape[0]} characters but the "
                                  f"vocabulary has {V}")
    want = (2, T, V) if models.kind(mcfg) == "sequence" else (2, V)  # logits of 2 examples
    try:
        with torch.device("meta"):
            x = torch.zeros((2, T), dtype=torch.long)
            for training in (False, True):
                logits, _ = model.forward(x, training=training)
                if tuple(logits.shape) != want:
                    raise ValueError(f"it maps (N, {T}) to {tuple(logits.shape)}, expected "
                                     f"{('N', *want[1:])}".replace("'", ""))
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError, NotImplementedError) as e:
        raise CheckpointError(f"{where}: the model spec does not fit its vocabulary and block size "
                              f"({str(e).splitlines()[0][:150] if str(e) else type(e).__name__})") from None
    return model


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _tensor_checks(t: dict[str, Tensor], model, tcfg: TrainConfig, where: Path
                   ) -> tuple[dict, dict | None, dict | None]:
    """Every tensor of the file against the model rebuilt from the spec and the optimizer tcfg names:
    names, shapes, dtypes, finite values (running and second-moment variances non-negative). Returns
    (stored params+buffers, inference, optimizer state or None)."""
    steps = tcfg.steps
    expected = {**{f"param.{k}": v for k, v in model.params().items()},
                **{f"buffer.{k}": v for k, v in model.buffers().items()}}
    if tcfg.optimizer != "sgd":  # AdamW's moments, one of each per parameter, and its update count
        expected.update({f"optim.{m}.{k}": v for m in "mv" for k, v in model.params().items()})
        expected["optim.t"] = torch.empty((), dtype=torch.int64)
    if any(k.startswith("inference.") for k in t):
        expected.update({f"inference.{k}": v for k, v in model.buffers().items()})
    expected["rng_state"] = torch.empty(torch.Generator().get_state().shape, dtype=torch.uint8)
    expected["losses"] = torch.empty((steps,), dtype=torch.float64)
    extra = sorted(set(t) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {_show(extra[0])} (the model has no such tensor)")
    for key, like in expected.items():
        if key not in t:
            raise CheckpointError(f"{where}: tensor {key} is missing")
        if tuple(t[key].shape) != tuple(like.shape):
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(t[key].shape)}, the model "
                                  f"expects {tuple(like.shape)}")
        if t[key].dtype != like.dtype:
            raise CheckpointError(f"{where}: tensor {key} is {t[key].dtype}, expected {like.dtype}")
        if key.startswith(("param.", "buffer.", "inference.", "optim.m.", "optim.v.")):
            if not bool(torch.isfinite(t[key]).all()):
                raise CheckpointError(f"{where}: tensor {key} holds NaN or infinite values")
            if key.endswith("running_var") or key.startswith("optim.v."):
                if bool((t[key] < 0).any()):
                    raise CheckpointError(f"{where}: tensor {key} holds negative variances")
    if "optim.t" in t and not 0 <= int(t["optim.t"]) <= MAX_STEPS:
        raise CheckpointError(f"{where}: tensor optim.t holds {int(t['optim.t'])}, not an update count")
    stored = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(("param.", "buffer."))}
    inference = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("inference.")} or None
    optimizer = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("optim.")} or None
    return stored, inference, optimizer


def load(directory: str | Path, layer_types: dict[str, type] | None = None) -> Checkpoint:
    """Load and validate a checkpoint directory; raises CheckpointError with a one-line reason.
    The model is rebuilt from its JSON spec with the built-in layer classes, plus `layer_types`
    ({"Name": Class}) for layers of the user's own: nothing named in the file is imported or run.
    Only meta.json and the tensor file it names are read, both regular files directly inside
    `directory` (no symlinks)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    where = str(d / META)
    for attempt in range(READ_ATTEMPTS):
        raw = _read_meta(d)
        meta = parse_meta(raw, where)
        tensors_path = d / meta["tensors_file"]
        try:  # opened at once: a writer deletes the file after its next save, an open one stays readable
            fd = io.open_inside(d, meta["tensors_file"])
            break
        except FileNotFoundError:
            if attempt + 1 < READ_ATTEMPTS and _read_meta(d) != raw:
                continue  # a writer saved a newer checkpoint meanwhile and removed this one: read it
            raise CheckpointError(f"{tensors_path}: missing (meta.json names it)") from None
        except io.UnsafeFileError as e:
            raise CheckpointError(str(e)) from None
    try:
        _consistent(meta, where)
        tcfg = meta["train_config"]
        shapes = _build(meta, layer_types, where)
    except BaseException:
        os.close(fd)
        raise
    size = (4 * _nbytes({**shapes.params(), **shapes.buffers()}) + 8 * tcfg.steps
            + 8192 + 1024 * (3 * len(shapes.params()) + 2 * len(shapes.buffers()) + 1) + (1 << 16))
    try:
        blob = io.read_fd(fd, tensors_path, size)
    except io.UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{tensors_path}: truncated or corrupt ({len(blob)} bytes, sha256 "
                              "does not match meta.json)")
    try:
        t = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tensors_path}: not a valid safetensors file ({str(e)[:100]})") from None
    stored, inference, optimizer_state = _tensor_checks(t, shapes, tcfg, tensors_path)
    model = from_spec(meta["model"], tcfg.torch_dtype, layer_types)  # now on the CPU, sizes checked
    for name, tensor in stored.items():
        set_tensor(model, name, tensor)
    gen = torch.Generator()
    try:
        gen.set_state(t["rng_state"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{tensors_path}: invalid RNG state ({str(e)[:100]})") from None
    state = TrainState(model, meta["step"], gen, t["losses"], new_optimizer(model, tcfg))
    if state.optimizer is not None:
        state.optimizer.load_state(optimizer_state)  # names, shapes and dtypes checked above
    return Checkpoint(meta["model_config"], tcfg, Vocab(tuple(meta["vocab"])), meta["data_path"], state,
                      inference, meta["results"], meta["block_size"], meta.get("data_sha256"),
                      meta.get("lr_history") or [lr_settings(tcfg, 0)])
