"""The engine planner: the one place that decides how a training step runs. `plan(model, tcfg, world,
threads)` picks the lecture MLP's fused native step, the native program (counted and tiled from a large
batch), the eager hand-written step, or the data-parallel form of one of them, and says why when it
falls back. Its thresholds are defined here, once. The engines themselves: train.eager_steps,
engines.native (csrc/), engines.parallel (torch.distributed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from handgrad import train
from handgrad.config import ConfigError, ref
from handgrad.data import Splits
from handgrad.engines import native, parallel
from handgrad.models import ModelConfig
from handgrad.train import StepsFn, TrainConfig, TrainState

# From COUNTED_ROWS examples per step in a process, the lecture MLP's step is faster as the native program
# with its first batchnorm counted and deferred, in tiles of CACHE_TILE examples: one pass over tiles that
# stay in the cache, nothing recomputed (program.cpp's Counted). Measured here, one thread, against the
# fused step: 0.95x at 2,048, 1.15x at 3,072, 1.1x at 4,096, 1.6x at 8,192, 1.8x at 16,384, 2.8x at
# 65,536 (benchmarks/PERFORMANCE.md); tiles of 64 to 512 all within 5% of each other. The program itself
# (the ranks run nothing else) is faster in those tiles from TILE_ROWS rows: 0.95x its untiled time at
# 1,024 in one process, and 2 ranks sharing one memory system gain more (2 processes at 4,096 with tiles:
# 1.38x one, untiled 0.99x; docs/scale.md).
COUNTED_ROWS = 4096
TILE_ROWS = 1024
CACHE_TILE = 128
THRESHOLDS = {"counted_rows": COUNTED_ROWS, "tile_rows": TILE_ROWS, "cache_tile": CACHE_TILE}  # for help
MAX_NATIVE_THREADS = 2  # the native program splits its large products over at most two threads


class EngineUnavailable(ConfigError):
    """engine "fast" was asked for but cannot run here; the message says why (one line)."""


class Plan(NamedTuple):
    """How the steps run: the engine (train.StepsFn), which one it is (title() says it for a header), and
    one line (fields named with config.ref) when it is not what tcfg.engine asked for ("" otherwise)."""

    steps: StepsFn
    name: str  # "fast" (native) or "eager"
    warning: str = ""


def cache_tile(model, rows: int, tile: int = 0) -> int:
    """The tile of the native program for `rows` examples per step in this process: `tile` when one is
    asked for; else CACHE_TILE for the lecture MLP from TILE_ROWS rows (its tiled step, counted, is one
    pass: tiles cost nothing there); else 0 (untiled)."""
    if tile or rows < TILE_ROWS or native.mlp_reason(model):
        return tile
    return CACHE_TILE


def native_steps(model, tcfg: TrainConfig, world=None, threads: int = 1) -> StepsFn | str:
    """The native engine for this model and config, or the one-line reason there is none. One process:
    the lecture MLP's fused step, or from COUNTED_ROWS examples per step its native program counted, in
    cache_tile's tiles; any other model its native program (split over up to two threads). A rank of
    `world` (an engines.parallel.Comm): the native program on one thread (a rank is a core), the mlp in
    cache_tile's tiles of its own rows."""
    if tcfg.optimizer != "sgd":
        return f"the native engine updates with SGD; {ref('optimizer')} {tcfg.optimizer} runs eager"
    tile, rows = tcfg.recompute_tile, tcfg.batch_size // (1 if world is None else world.world)
    if world is not None:
        reason = program_ready(model)
        if reason:
            return reason
        return parallel.native_data_parallel_steps(world, native.load_program_library(),
                                                   cache_tile(model, rows, tile))
    threads = min(MAX_NATIVE_THREADS, threads)
    if not native.mlp_reason(model):
        if rows >= COUNTED_ROWS and not native.program_reason(model):
            try:
                return native.make_program_fn(native.load_program_library(), cache_tile(model, rows, tile),
                                              threads, count=True)
            except native.FastUnavailable:
                pass  # the fused step below still runs it
        try:
            return native.make_steps_fn(native.load_library(), tile)
        except native.FastUnavailable as e:
            return str(e)
    reason = program_ready(model)
    return reason or native.make_program_fn(native.load_program_library(), tile, threads)


def program_ready(model) -> str:
    """"" when the native program can run the model here (it knows its layers and the library
    builds), else why not."""
    reason = native.program_reason(model)
    if not reason:
        try:
            native.load_program_library()
        except native.FastUnavailable as e:
            reason = str(e)
    return reason


def plan(model, tcfg: TrainConfig, world=None, threads: int = 1) -> Plan:
    """The engine for `model` under `tcfg` in this process (world None) or as one rank of `world`:
    native when tcfg.engine is "auto" or "fast" and native_steps has one, else the eager step with a
    warning saying why ("auto"); "fast" raises EngineUnavailable instead. threads: the CPU threads
    torch may use (the native program takes up to MAX_NATIVE_THREADS of them in one process)."""
    warnings = []
    if tcfg.engine != "eager":
        steps = native_steps(model, tcfg, world, threads)
        if not isinstance(steps, str):
            return Plan(steps, "fast")
        if tcfg.engine == "fast":
            raise unavailable(steps)
        warnings.append(f"fast path unavailable ({steps}); using the eager path")
    if tcfg.recompute_tile:
        warnings.append(f"activation checkpointing ({ref('recompute_tile')}) needs the fast engine; ignored")
    eager = train.eager_steps if world is None else parallel.data_parallel_steps(world)
    return Plan(eager, "eager", "; ".join(warnings))


def unavailable(reason: str) -> EngineUnavailable:
    """The refusal of engine "fast" when the native engine cannot run (`reason`)."""
    return EngineUnavailable(f"{ref('engine')} fast: the fast engine is unavailable ({reason}); use "
                             f"{ref('engine')} auto or eager")


def title(plan: Plan, model, world=None) -> str:
    """The engine as a run reports it: "fast", "eager", "2-rank data-parallel fast (gloo)"."""
    if world is None:
        return plan.name
    device = next(iter(model.params().values())).device.type
    return f"{world.world}-rank data-parallel {plan.name} ({parallel.BACKENDS[device]})"


def fit(splits: Splits, mcfg: ModelConfig | None, tcfg: TrainConfig, state: TrainState | None = None,
        callback: Callable[[train.Progress], None] | None = None, threads: int = 1) -> TrainState:
    """train.train with the engine plan() picks for tcfg (as `handgrad train` runs one process)."""
    state = state or train.state_of_splits(mcfg, tcfg, splits)
    return train.train(splits, mcfg, tcfg, state, callback, plan(state.model, tcfg, threads=threads).steps)
