"""Evaluation throughput: full model + every relation's subnetwork, batched (ours) vs one prompt
at a time (the reference).

    python -m bench.eval_throughput                    # small config, 2-core CPU
    python -m bench.eval_throughput --size base --relations 16 --prompts 256   # GPU

Figures are prompts per second, counting each prompt twice (full model and its subnetwork).
"""

from __future__ import annotations

import argparse
import json

from bench.common import SIZES, median_time, peak_rss_mb, random_batch, run_side


def ours(size: dict, relations: int, prompts: int, batch: int, length: int,
         repeats: int) -> dict:
    import time

    import jax

    from lamp_jax.evaluation import evaluate, make_rank_fn
    from lamp_jax.masks import MATRICES, MaskInit, MaskMode, MaskSpec, init_mask_logits
    from lamp_jax.models.bert import ModelConfig, init_params

    config = ModelConfig(**{k: v for k, v in size.items() if k != "layers"})
    params = init_params(config, jax.random.key(0))
    logits = init_mask_logits(MaskSpec(size["layers"], tuple(MATRICES)), params, relations,
                              MaskInit("normal", value=1.0), MaskMode(), jax.random.key(1))
    rank_fn = make_rank_fn(config, MaskMode("threshold"))
    batches = [random_batch(relations, batch, length, config.vocab_size, seed=s)
               for s in range(prompts // batch)]
    names = tuple(str(r) for r in range(relations))
    start = time.perf_counter()
    evaluate(rank_fn, logits, params, batches[:1], names)
    evaluate(rank_fn, None, params, batches[:1], names)
    compile_s = time.perf_counter() - start

    def both():
        evaluate(rank_fn, logits, params, batches, names)
        evaluate(rank_fn, None, params, batches, names)

    seconds = median_time(both, repeats)
    return {"seconds": seconds, "evaluated": 2 * relations * len(batches) * batch,
            "compile_s": compile_s, "peak_rss_mb": peak_rss_mb()}


def baseline(size: dict, relations: int, prompts: int, length: int, repeats: int) -> dict:
    import os

    import torch
    import transformers

    from bench.baseline_torch import ReferenceLAMP
    from lamp_jax.masks import MATRICES

    torch.set_num_threads(os.cpu_count() or 1)
    config = transformers.BertConfig(
        vocab_size=size["vocab_size"], hidden_size=size["hidden_size"],
        num_hidden_layers=size["num_layers"], num_attention_heads=size["num_heads"],
        intermediate_size=size["intermediate_size"], max_position_embeddings=512)
    lamp = ReferenceLAMP(transformers.BertForMaskedLM(config), relations, size["layers"],
                         list(MATRICES))
    data = random_batch(relations, prompts, length, size["vocab_size"])
    items = [[{k: torch.tensor(data[k][r, i]).long() for k in
               ("input_ids", "attention_mask", "mask_pos", "obj_id")} for i in range(prompts)]
             for r in range(relations)]

    def both():
        lamp.evaluate(items, subnetwork=True)
        lamp.evaluate(items, subnetwork=False)

    seconds = median_time(both, repeats)
    return {"seconds": seconds, "evaluated": 2 * relations * prompts,
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--relations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=128, help="per relation (ours)")
    parser.add_argument("--baseline-prompts", type=int, default=32, help="per relation")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=("both", "ours", "torch"), default="both")
    args = parser.parse_args()
    size = SIZES[args.size]
    if args.side == "ours":
        print(json.dumps(ours(size, args.relations, args.prompts, args.batch, args.length,
                              args.repeats)))
        return
    if args.side == "torch":
        print(json.dumps(baseline(size, args.relations, args.baseline_prompts, args.length,
                                  args.repeats)))
        return
    common = ["--size", args.size, "--relations", str(args.relations), "--prompts",
              str(args.prompts), "--baseline-prompts", str(args.baseline_prompts), "--batch",
              str(args.batch), "--length", str(args.length), "--repeats", str(args.repeats)]
    a = run_side("bench.eval_throughput", "ours", common)
    b = run_side("bench.eval_throughput", "torch", common)
    rate_a, rate_b = a["evaluated"] / a["seconds"], b["evaluated"] / b["seconds"]
    print(f"eval throughput, size={args.size}, R={args.relations}, L={args.length}")
    print(f"{'':<30}{'prompts/s':>12}{'peak RSS MB':>13}")
    print(f"{'lamp-jax (batched, jitted)':<30}{rate_a:>12.1f}{a['peak_rss_mb']:>13.0f}")
    print(f"{'reference (one at a time)':<30}{rate_b:>12.1f}{b['peak_rss_mb']:>13.0f}")
    print(f"ratio ours/baseline: {rate_a / rate_b:.1f}x (ours compiled in {a['compile_s']:.1f} s)")


if __name__ == "__main__":
    main()
