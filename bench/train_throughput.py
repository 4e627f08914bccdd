"""Training throughput: lamp-jax's vmapped step vs the reference algorithm in PyTorch.

    python -m bench.train_throughput                   # small config, 2-core CPU, ~1 minute
    python -m bench.train_throughput --size base --relations 16 --batch 32 --length 20  # GPU

Both sides use the same model shapes, relations, batch, length, masked layers and matrices, the
deterministic (straight-through) mode, and Adam with per-relation clipping. Each side runs in its
own process; figures are relation-examples per second (R * B / step time) and peak memory.
"""

from __future__ import annotations

import argparse
import json

from bench.common import (
    SIZES,
    matmul_peak_gflops,
    median_time,
    peak_rss_mb,
    random_batch,
    run_side,
    train_flops_per_example,
)


def ours(size: dict, relations: int, batch: int, length: int, repeats: int,
         dtype: str) -> dict:
    import time

    import jax
    import jax.numpy as jnp

    from lamp_jax.masks import MATRICES, MaskInit, MaskMode, MaskSpec, init_mask_logits
    from lamp_jax.models.bert import ModelConfig, init_params
    from lamp_jax.training import (
        LossConfig,
        OptimConfig,
        init_train_state,
        jit_train_step,
        make_optimizer,
    )

    config = ModelConfig(**{k: v for k, v in size.items() if k != "layers"})
    params = init_params(config, jax.random.key(0))
    mode = MaskMode("deterministic")
    logits = init_mask_logits(MaskSpec(size["layers"], tuple(MATRICES)), params, relations,
                              MaskInit("normal", value=1.0), mode, jax.random.key(1))
    optim = OptimConfig()
    state = init_train_state(logits, make_optimizer(optim), 10_000, jax.random.key(2))
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    step = jit_train_step(model_config=config, loss_config=LossConfig(mode,
                          compute_dtype=compute), optim_config=optim)
    data = jax.device_put(random_batch(relations, batch, length, config.vocab_size))
    start = time.perf_counter()
    state, _ = step(state, params, data)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start

    def one():
        nonlocal state
        state, _ = step(state, params, data)
        jax.block_until_ready(state.mask_logits)

    seconds = median_time(one, repeats)
    memory = jax.devices()[0].memory_stats() or {}
    return {"step_s": seconds, "compile_s": compile_s, "peak_rss_mb": peak_rss_mb(),
            "matmul_peak_gflops": matmul_peak_gflops(),
            "peak_device_mb": memory.get("peak_bytes_in_use", 0) / 2**20,
            "device": jax.devices()[0].device_kind}


def baseline(size: dict, relations: int, batch: int, length: int, repeats: int) -> dict:
    import os

    import torch
    import transformers

    from bench.baseline_torch import ReferenceLAMP
    from lamp_jax.masks import MATRICES

    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.BertConfig(
        vocab_size=size["vocab_size"], hidden_size=size["hidden_size"],
        num_hidden_layers=size["num_layers"], num_attention_heads=size["num_heads"],
        intermediate_size=size["intermediate_size"], max_position_embeddings=512)
    model = transformers.BertForMaskedLM(config).to(device)
    lamp = ReferenceLAMP(model, relations, size["layers"], list(MATRICES))
    data = random_batch(relations, batch, length, size["vocab_size"])
    batches = [{k: torch.tensor(v[r]).long().to(device) for k, v in data.items()
                if k != "weight"} for r in range(relations)]
    lamp.train_step(batches)  # warm-up

    def one():
        lamp.train_step(batches)
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = median_time(one, repeats)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    return {"step_s": seconds, "peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_gpu,
            "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--relations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--baseline-repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--side", choices=("both", "ours", "torch"), default="both")
    args = parser.parse_args()
    size = SIZES[args.size]
    shape = (args.relations, args.batch, args.length)
    if args.side == "ours":
        print(json.dumps(ours(size, *shape, args.repeats, args.dtype)))
        return
    if args.side == "torch":
        print(json.dumps(baseline(size, *shape, args.baseline_repeats)))
        return
    common = ["--size", args.size, "--relations", str(args.relations), "--batch",
              str(args.batch), "--length", str(args.length), "--repeats", str(args.repeats),
              "--baseline-repeats", str(args.baseline_repeats), "--dtype", args.dtype]
    a = run_side("bench.train_throughput", "ours", common)
    b = run_side("bench.train_throughput", "torch", common)
    examples = args.relations * args.batch
    print(f"train throughput, size={args.size}, R={args.relations}, B={args.batch}, "
          f"L={args.length}, masked layers {size['layers']}, dtype {args.dtype}")
    print(f"{'':<22}{'step s':>10}{'rel-examples/s':>16}{'peak RSS MB':>13}{'peak dev MB':>13}")
    for name, r in (("lamp-jax (vmapped)", a), ("reference (torch)", b)):
        print(f"{name:<22}{r['step_s']:>10.4f}{examples / r['step_s']:>16.1f}"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_device_mb']:>13.0f}")
    print(f"ratio ours/baseline: {b['step_s'] / a['step_s']:.1f}x  "
          f"(ours compiled once in {a['compile_s']:.1f} s; device {a['device']})")
    flops = train_flops_per_example(size, args.length) * examples
    achieved = flops / a["step_s"] / 1e9
    print(f"model FLOPs per step {flops / 1e9:.2f} G; ours achieves {achieved:.1f} GFLOP/s = "
          f"{100 * achieved / a['matmul_peak_gflops']:.0f}% of this device's measured matmul "
          f"peak ({a['matmul_peak_gflops']:.0f} GFLOP/s); the baseline "
          f"{flops / b['step_s'] / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
