"""Shared pieces of the benchmarks: model sizes, random batches, timing, peak memory."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

SIZES = {
    # About a minute for both sides of train_throughput on a 2-core CPU.
    "small": dict(vocab_size=1000, hidden_size=128, num_layers=4, num_heads=4,
                  intermediate_size=512, layers=(2, 3)),
    # bert-base shapes (random weights), masks on layers 6..11 as in the paper: for GPUs.
    "base": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                 intermediate_size=3072, layers=tuple(range(6, 12))),
}


def random_batch(relations: int, batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    """``[R, B, L]`` prompts with a [MASK] (id 4) at a random position and random objects."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (relations, batch, length)).astype(np.int32)
    mask_pos = rng.integers(1, length - 1, (relations, batch)).astype(np.int32)
    np.put_along_axis(ids, mask_pos[..., None], 4, axis=-1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "mask_pos": mask_pos,
            "obj_id": rng.integers(5, vocab, (relations, batch)).astype(np.int32),
            "weight": np.ones((relations, batch), np.float32)}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(module: str, side: str, args: list[str]) -> dict:
    """Runs one side of a benchmark in its own process (separate peak memory) -> its JSON."""
    out = subprocess.run([sys.executable, "-m", module, "--side", side, *args],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{module} --side {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_flops_per_example(size: dict, length: int) -> float:
    """Matmul FLOPs of one relation-example of the masked-LM step (forward + backward).

    Per layer forward: 2*L*(4*H^2 + 2*H*F) (Q, K, V, out, FFN in/out) + 4*L^2*H (scores and
    mixing). Every layer runs forward; the masked layers also run backward, which costs twice
    their forward (activation gradients plus the weight gradients that the mask gradients need);
    layers below the lowest masked one need no backward. The MLM head runs at the [MASK] only:
    2*H^2 + 2*H*V forward, twice that backward (activation gradients).
    """
    h, f, v = size["hidden_size"], size["intermediate_size"], size["vocab_size"]
    layer = 2 * length * (4 * h * h + 2 * h * f) + 4 * length * length * h
    masked_and_above = size["num_layers"] - min(size["layers"])
    head = 2 * h * h + 2 * h * v
    return size["num_layers"] * layer + 2 * masked_and_above * layer + 3 * head


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 GFLOP/s of one large matmul: the practical peak of this device."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / median_time(lambda: f(a).block_until_ready(), repeats) / 1e9
