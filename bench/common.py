"""Shared pieces of the benchmarks: model sizes, random batches, timing, peak memory, FLOPs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lamp_jax.hosts import peak_rss_bytes
from lamp_jax.placement import available_cores

SIZES = {
    # About a minute for train_throughput (both sides, three rounds) on a 2-core CPU.
    "small": dict(vocab_size=1000, hidden_size=128, num_layers=4, num_heads=4,
                  intermediate_size=512, layers=(2, 3)),
    # bert-base shapes (random weights), masks on layers 6..11 as in the paper: for GPUs.
    "base": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                 intermediate_size=3072, layers=tuple(range(6, 12))),
}
MASK_ID = 4  # any id works for random weights; it only marks where the object goes


def add_step_arguments(parser, mode: bool = True) -> None:
    """The shape of a training step, as every step benchmark takes it: model size, relations,
    prompts per relation, length, compute dtype and (optionally) mask mode."""
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--relations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="prompts per relation")
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    if mode:
        parser.add_argument("--moment-dtype", choices=("float32", "bfloat16"),
                            default="float32",
                            help="storage of Adam's moments (config.optim.moment_dtype)")
        parser.add_argument("--mode", choices=("deterministic", "stochastic"),
                            default="deterministic")


def add_cpu_devices_argument(parser) -> None:
    """``--cpu-devices``: what ``config.cpu_devices`` is to train.py."""
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="ours on a CPU: JAX devices to split the host into, relations "
                        "split over them as train.py does (0 = one per core, train.py's "
                        "default; 1 = one device using every core)")


def add_peer_arguments(parser) -> None:
    """The strong PyTorch peer's sides and settings (train and eval throughput)."""
    parser.add_argument("--peer", choices=("both", "eager", "compiled", "none"), default="both",
                        help="which sides of the strong PyTorch peer (peer_torch.py) to run")
    parser.add_argument("--peer-compile-mode", default=None,
                        help="torch.compile mode of the compiled peer (default: Inductor's "
                        "default; e.g. max-autotune-no-cudagraphs, reduce-overhead)")
    parser.add_argument("--peer-warm-cache", action="store_true",
                        help="compiled peer: keep Inductor's persistent cache (default: a fresh "
                        "one, so its first call is a cold compile)")
    parser.add_argument("--peer-allocator", choices=("heap", "default"), default="heap",
                        help="peer on a CPU: 'heap' keeps glibc malloc on one heap with no mmap "
                        "or trimming (peer_torch.keep_one_heap: no page faults per step); "
                        "'default': glibc's defaults")
    parser.add_argument("--peer-compiled", action="store_true", help=argparse.SUPPRESS)


def model_shape(size: dict) -> dict:
    """The architecture part of a SIZES entry (without the masked layers)."""
    return {k: v for k, v in size.items() if k != "layers"}


def random_batch(relations: int, batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    """``[R, B, L]`` prompts with one [MASK] at a random position and random objects."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (relations, batch, length)).astype(np.int32)
    mask_pos = rng.integers(1, length - 1, (relations, batch)).astype(np.int32)
    np.put_along_axis(ids, mask_pos[..., None], MASK_ID, axis=-1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "mask_pos": mask_pos,
            "obj_id": rng.integers(5, vocab, (relations, batch)).astype(np.int32),
            "weight": np.ones((relations, batch), np.float32)}


def synthetic_run(size: dict, relations: int, batch: int, length: int, dtype: str = "float32",
                  mode: str = "deterministic", relation_chunk: int | None = None,
                  cache_prefix: bool = True, relation_parallelism: int | None = None,
                  moment_dtype: str = "float32", seed: int = 0):
    """train.py's own setup (:func:`lamp_jax.setup.setup_training`) of a random model of
    ``size`` and ``relations`` x ``batch`` random prompts of ``length`` tokens per split: the
    benchmarks time the step, ranking and placement a run would use, not a copy of them.
    ``relation_chunk``: relations per device at a time (None: all at once, as on a device
    with memory to spare); one training step is one epoch."""
    import jax
    import jax.numpy as jnp

    from lamp_jax.configs import default
    from lamp_jax.data import EncodedPrompts
    from lamp_jax.data.prepare import PreparedData
    from lamp_jax.models import LoadedMLM, ModelConfig, init_params
    from lamp_jax.setup import setup_training

    model = ModelConfig(**model_shape(size), max_position_embeddings=max(512, length))
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    params = jax.tree.map(lambda x: x.astype(compute), init_params(model, jax.random.key(seed)))
    mlm = LoadedMLM(params, model, None, f"random {model.family} ({size['hidden_size']} wide)",
                    compute)
    names = tuple(f"r{r}" for r in range(relations))
    splits = {}
    for i, name in enumerate(("train", "dev", "test")):
        b = random_batch(relations, batch, length, model.vocab_size, seed=seed + i)
        rows = relations * batch
        splits[name] = EncodedPrompts(
            b["input_ids"].reshape(rows, length), b["attention_mask"].reshape(rows, length),
            b["mask_pos"].reshape(rows), b["obj_id"].reshape(rows),
            np.repeat(np.arange(relations, dtype=np.int32), batch),
            np.arange(rows, dtype=np.int32), names)
    config = default.get_config()
    config.model, config.data.source = mlm.source, "synthetic"
    config.dtype, config.optim.moment_dtype, config.mask.mode = dtype, moment_dtype, mode
    config.mask.first_layer, config.mask.last_layer = min(size["layers"]), max(size["layers"])
    config.mask.init, config.mask.init_value = "normal", 1.0
    config.batch_size, config.epochs, config.seed = batch, 1, seed
    config.cache_frozen_prefix = cache_prefix
    config.relation_parallelism = relation_parallelism or 0
    # None: all at once (a chunk as large as the axis), whatever the memory rule would pick.
    config.relation_chunk = relation_chunk or 2**20
    config.cpu_devices = 0  # set by the caller's use_cpu_devices, before JAX starts
    return setup_training(config, log=lambda *_: None, mlm=mlm,
                          data=PreparedData(names, splits, {k: [] for k in splits}))


class CompileCounter:
    """Counts XLA compilations while active (``with CompileCounter() as c: ...; c.count``).

    A jitted function's ``_cache_size()`` is no such count: on a multi-device mesh its dispatch
    cache adds an entry for outputs fed back as inputs without compiling anything."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0

    def _listen(self, event: str, _seconds: float, **_kwargs) -> None:
        self.count += event == self.EVENT

    def __enter__(self) -> CompileCounter:
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listen)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (``fn`` must block until done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_steps(step: Callable, state: Any, inputs: tuple, repeats: int,
               warmup: int = 0, during: Any = None) -> tuple[float, float]:
    """Times a jitted training step ``step(state, *inputs)`` (inputs: frozen params, batch,
    peak learning rate) fed its own new state: ``(median seconds of `repeats` steps, seconds
    of the first call)``. The first call compiles the step (unless it was
    compiled before); ``warmup`` untimed steps follow it, then the timed ones, all inside the
    context manager ``during`` (e.g. a :class:`CompileCounter`) when one is given."""
    import jax

    start = time.perf_counter()
    state, _ = step(state, *inputs)
    jax.block_until_ready(state)
    first_s = time.perf_counter() - start

    def one():
        nonlocal state
        state, _ = step(state, *inputs)
        jax.block_until_ready(state.mask_logits)

    with during if during is not None else contextlib.nullcontext():
        for _ in range(warmup):
            one()
        return median_time(one, repeats), first_s


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (:func:`lamp_jax.hosts.peak_rss_bytes`)."""
    return peak_rss_bytes() / 2**20




def machine() -> str:
    """CPU model, core count and allocator settings, for the printed report."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # Allocator settings change large-model CPU figures by up to 1.8x (bench/README.md).
    allocator = "; ".join(f"{k}={os.environ[k]}" for k in ("GLIBC_TUNABLES", "LD_PRELOAD")
                          if os.environ.get(k))
    return (f"{model}, {available_cores()} cores, load average {os.getloadavg()[0]:.2f}"
            + (f"; {allocator}" if allocator else ""))


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (Linux /proc/stat; zeros elsewhere)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0, 0
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def wait_for_quiet_cpu(max_wait_s: float, busy_below: float = 0.15) -> float:
    """Waits (up to ``max_wait_s``) until the CPUs are nearly idle for one second, since other
    processes on a shared machine distort timings; returns the busy fraction last seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, total0 = _cpu_jiffies()
        time.sleep(1.0)
        busy1, total1 = _cpu_jiffies()
        busy = (busy1 - busy0) / max(total1 - total0, 1)
        if busy < busy_below or time.monotonic() >= deadline:
            return busy


def run_side(module: str, side: str, args: list[str], quiet_wait_s: float = 0.0) -> dict:
    """Runs one side of a benchmark in its own process (separate peak memory) -> its JSON.

    Adds ``others_cpu``: the share of the machine's CPU time that other processes used while
    it ran (0 = we had the machine to ourselves), so contended rounds can be seen.
    """
    if quiet_wait_s:
        wait_for_quiet_cpu(quiet_wait_s)
    busy0, total0 = _cpu_jiffies()
    own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-m", module, "--side", side, *args],
                         capture_output=True, text=True, check=False)
    own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, total1 = _cpu_jiffies()
    if out.returncode:
        raise RuntimeError(f"{module} --side {side} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ticks = os.sysconf("SC_CLK_TCK")
    own = (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime) * ticks
    result["others_cpu"] = max(0.0, (busy1 - busy0 - own) / max(total1 - total0, 1))
    return result


def layer_flops(size: dict, length: int, rows: int | None = None) -> float:
    """Matmul FLOPs of one encoder layer's forward for one sequence of ``length`` tokens whose
    output is needed at ``rows`` of them (default all): keys and values for every token
    (2*L*2*H^2), queries, attention output and FFN for the rows (2*rows*(2*H^2 + 2*H*F)), and
    4*rows*L*H for the attention scores and the mixing of values."""
    h, f = size["hidden_size"], size["intermediate_size"]
    rows = length if rows is None else rows
    return 2 * length * 2 * h * h + 2 * rows * (2 * h * h + 2 * h * f) + 4 * rows * length * h


def forward_flops(size: dict, length: int, *, start_layer: int = 0, rows_only: bool = True,
                  head_positions: int = 1) -> float:
    """Matmul FLOPs of one forward pass of one prompt: layers ``start_layer..N-1`` (the ones
    below come from a cached prefix), the last layer only at [MASK] when ``rows_only``, and
    the MLM head (2*H^2 + 2*H*V each) at ``head_positions`` positions."""
    h, v, n = size["hidden_size"], size["vocab_size"], size["num_layers"]
    layers = sum(layer_flops(size, length, 1 if rows_only and i == n - 1 else None)
                 for i in range(start_layer, n))
    return layers + head_positions * (2 * h * h + 2 * h * v)


def train_flops_per_example(size: dict, length: int, *, cached_prefix: bool = True,
                            rows_only: bool = True, head_positions: int = 1) -> float:
    """Matmul FLOPs one side executes per relation-example of a step (forward + backward).

    The forward is :func:`forward_flops`. Layers from the lowest masked one up and the head
    also run backward, at twice their forward (activation gradients, and the weight gradients
    the mask gradients are made of); layers below the lowest masked one need none.
    lamp-jax: ``cached_prefix`` (the layers below the lowest masked one are not run in the
    step; their one-off cost is timed separately) and ``rows_only``. The reference:
    ``cached_prefix=False, rows_only=False, head_positions=length`` (Hugging Face's model runs
    every layer on every row and the head at every position).
    """
    lowest = min(size["layers"])
    upper = forward_flops(size, length, start_layer=lowest, rows_only=rows_only,
                          head_positions=head_positions)
    prefix = 0.0 if cached_prefix else forward_flops(size, length, head_positions=0) - \
        forward_flops(size, length, start_layer=lowest, head_positions=0)
    return prefix + 3 * upper


def eval_flops_per_prompt(size: dict, length: int, *, start_layer: int = 0,
                          rows_only: bool = True, head_positions: int = 1) -> float:
    """Matmul FLOPs of one forward pass (see :func:`forward_flops`)."""
    return forward_flops(size, length, start_layer=start_layer, rows_only=rows_only,
                         head_positions=head_positions)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 GFLOP/s of one large jitted matmul: this device's practical peak."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / median_time(lambda: f(a).block_until_ready(), repeats) / 1e9


def jax_device_summary() -> dict[str, Any]:
    """Kind and peak bytes in use of JAX's first device (0 where the backend keeps no stats)."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {"device": f"{device.platform}:{device.device_kind}",
            "peak_device_mb": stats.get("peak_bytes_in_use", 0) / 2**20}


def torch_setup() -> str:
    """Gives torch as many threads as XLA gets; returns the device the baseline runs on."""
    import torch

    torch.set_num_threads(available_cores())
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_prompts(data: dict, device: str) -> list[list[dict]]:
    """``[R, B, ...]`` numpy arrays -> per relation, a list of single-prompt torch tensors."""
    import torch

    relations, count = data["input_ids"].shape[:2]
    keys = ("input_ids", "attention_mask", "mask_pos", "obj_id")
    return [[{k: torch.as_tensor(data[k][r, i], dtype=torch.long, device=device) for k in keys}
             for i in range(count)] for r in range(relations)]


def torch_batches(data: dict, device: str) -> list[dict]:
    """``[R, B, ...]`` numpy arrays -> per relation, the reference's batch with MLM labels."""
    import torch

    from bench.baseline_torch import mlm_labels

    out = []
    for r in range(data["input_ids"].shape[0]):
        t = {k: torch.as_tensor(data[k][r], dtype=torch.long, device=device)
             for k in ("input_ids", "attention_mask", "mask_pos", "obj_id")}
        out.append({"input_ids": t["input_ids"], "attention_mask": t["attention_mask"],
                    "labels": mlm_labels(t["input_ids"], t["mask_pos"], t["obj_id"])})
    return out


def torch_bert_kwargs(size: dict, length: int) -> dict:
    """BertConfig arguments for the same architecture as ``size``."""
    return dict(vocab_size=size["vocab_size"], hidden_size=size["hidden_size"],
                num_hidden_layers=size["num_layers"], num_attention_heads=size["num_heads"],
                intermediate_size=size["intermediate_size"],
                max_position_embeddings=max(512, length))
