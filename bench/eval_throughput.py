"""Evaluation throughput: the full model + every relation's subnetwork, batched (ours) vs one
prompt at a time (the reference).

    python -m bench.eval_throughput                    # small config, 2-core CPU, ~1 minute
    python -m bench.eval_throughput --size base --relations 16 --prompts 512 --batch 128 \\
        --baseline-prompts 16 --length 20              # bert-base shapes, GPU

Each prompt is evaluated twice, by its relation's binary subnetwork and by the full model, and
counted twice: prompts/s = 2 * R * prompts / seconds. Ours calls ``evaluate`` (jitted
``batch_rank_stats``) on ``[R, batch, L]`` batches; the baseline runs the reference's loop, with
its surgery and state-dict reload per prompt (``per_prompt``, as the reference) and, for
comparison, once per relation (``per_relation``); the strong PyTorch peer
(``peer_torch.py``, eager and ``torch.compile``-d) ranks the same ``[R, batch, L]`` batches as
ours, with every relation's threshold masks applied as ``[R, in, out]`` weights formed once per
evaluation. Ours and the peer run the frozen prefix once per prompt for both evaluations, inside
the timed region. The sides alternate for ``--rounds`` rounds; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from bench.common import (
    SIZES,
    CompileCounter,
    add_cpu_devices_argument,
    add_peer_arguments,
    eval_flops_per_prompt,
    jax_device_summary,
    machine,
    median_time,
    model_shape,
    peak_rss_mb,
    random_batch,
    run_side,
    synthetic_run,
    torch_bert_kwargs,
    torch_prompts,
    torch_setup,
)


def ours(size: dict, relations: int, prompts: int, batch: int, length: int, repeats: int,
         dtype: str, cpu_devices: int) -> dict:
    import time

    from lamp_jax.placement import use_cpu_devices
    from lamp_jax.prefix import batch_prefix_hidden_states
    from lamp_jax.ranking import evaluate

    use_cpu_devices(cpu_devices)  # as train.py does, before JAX starts
    # train.py's own setup of a random model (bench.common.synthetic_run): its mesh, inert
    # slots, placement and jitted ranking, all relations at once (memory to spare).
    run = synthetic_run(size, relations, batch, length, dtype)
    logits = run.init_state(log=lambda *_: None).mask_logits
    rank_fn = run.rank_fn("threshold")
    if prompts % batch:
        raise ValueError(f"--prompts {prompts} must be a multiple of --batch {batch}")
    batches = [random_batch(relations, batch, length, run.mlm.config.vocab_size, seed=s)
               for s in range(prompts // batch)]

    def with_prefix(b: dict) -> dict:
        # The frozen layers below the masked ones run once per prompt, for both evaluations.
        return dict(b, hidden=batch_prefix_hidden_states(
            run.frozen, b, model_config=run.mlm.config, stop_layer=run.start_layer,
            dtype=run.dtype, mesh=run.mesh))

    def both(chosen=batches):
        ready = [with_prefix(b) for b in chosen]
        # evaluate returns host numpy: synchronous
        evaluate(rank_fn, logits, run.frozen, ready, run.relations, put_batch=run.put)
        evaluate(rank_fn, None, run.frozen, ready, run.relations, put_batch=run.put)

    start = time.perf_counter()
    both(batches[:1])
    compile_s = time.perf_counter() - start
    with CompileCounter() as compiles:
        seconds = median_time(both, repeats)
    return {"seconds": seconds, "evaluated": 2 * relations * prompts, "compile_s": compile_s,
            "mesh": dict(run.mesh.shape), "relation_chunk": None,
            "recompiled": compiles.count > 0, "peak_rss_mb": peak_rss_mb(),
            **jax_device_summary()}


def baseline(size: dict, relations: int, prompts: int, length: int, repeats: int,
             surgery: str) -> dict:
    import torch

    from bench.baseline_torch import ReferenceLAMP, reference_bert
    from lamp_jax.models import FAMILIES

    device = torch_setup()
    torch.manual_seed(0)
    model = reference_bert(torch_bert_kwargs(size, length)).to(device)
    lamp = ReferenceLAMP(model, relations, size["layers"], list(FAMILIES["bert"].matrices),
                         surgery=surgery)
    items = torch_prompts(random_batch(relations, prompts, length, size["vocab_size"]), device)
    lamp.evaluate([r[:1] for r in items])  # warm-up
    seconds = median_time(lambda: lamp.evaluate(items), repeats)  # .tolist() syncs a GPU
    return {"seconds": seconds, "evaluated": 2 * relations * prompts,
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def peer(size: dict, relations: int, prompts: int, batch: int, length: int, repeats: int,
         dtype: str, compiled: bool, compile_mode: str | None = None,
         warm_cache: bool = False, one_heap: bool = True) -> dict:
    """The strong PyTorch peer's evaluation: per call, the threshold weights of every relation
    once, then for each ``[R, batch, L]`` batch the frozen prefix, the subnetworks' ranks and
    the full model's; the per-relation sums reach the host once, at the end."""
    if compiled and not warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="peer_inductor_")
    import time

    import torch

    from bench.peer_torch import PeerLAMP, PeerShape, PeerWeights, keep_one_heap

    heap = keep_one_heap() if one_heap else False  # before torch's first parallel op
    device = torch_setup()
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as XLA's default on Hopper
    shape = PeerShape(**model_shape(size), max_position_embeddings=max(512, length))
    lamp = PeerLAMP(PeerWeights.random(shape), relations, size["layers"], device=device,
                    dtype=getattr(torch, dtype))
    if compiled:
        lamp.compile_ranking(compile_mode)
    if prompts % batch:
        raise ValueError(f"--prompts {prompts} must be a multiple of --batch {batch}")
    batches = []
    for s in range(prompts // batch):
        data = random_batch(relations, batch, length, shape.vocab_size, seed=s)
        batches.append({k: torch.as_tensor(v, device=device) for k, v in data.items()})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def both(chosen=batches):
        masked = lamp.threshold_weights()
        totals = None
        for b in chosen:
            ready = dict(b, hidden=lamp.prefix(b["input_ids"], b["attention_mask"]),
                         mask_pos=b["mask_pos"].long(), obj_id=b["obj_id"].long())
            for weights in (masked, None):
                stats = lamp.rank_stats(ready, weights)
                part = torch.cat([stats["hits"], stats["rr"][:, None], stats["count"][:, None]],
                                 dim=1)
                totals = part if totals is None else totals + part
        totals.cpu()  # the figures on the host, as ours returns them
        sync()

    start = time.perf_counter()
    both(batches[:1])
    compile_s = time.perf_counter() - start
    both(batches[:1])
    seconds = median_time(both, repeats)
    return {"seconds": seconds, "evaluated": 2 * relations * prompts, "compile_s": compile_s,
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
            "device": f"torch {device}", "one_heap": heap}


PEER_SIDES = {"eager": False, "compiled": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--relations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=256, help="per relation (ours)")
    parser.add_argument("--batch", type=int, default=32, help="ours: prompts per relation "
                        "per call (32 was the fastest of 16/32/64/128 on the 2-core CPU)")
    parser.add_argument("--baseline-prompts", type=int, default=32, help="per relation")
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--surgery", choices=("per_prompt", "per_relation"),
                        default="per_prompt", help="baseline (internal; main runs both)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each run, wait up to this many seconds for idle CPUs")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the reference re-creation (baseline_torch.py)")
    add_peer_arguments(parser)
    parser.add_argument("--side", choices=("both", "ours", "torch", "peer"), default="both")
    add_cpu_devices_argument(parser)
    args = parser.parse_args()
    size = SIZES[args.size]
    if args.side == "ours":
        print(json.dumps(ours(size, args.relations, args.prompts, args.batch, args.length,
                              args.repeats, args.dtype, args.cpu_devices)))
        return
    if args.side == "torch":
        print(json.dumps(baseline(size, args.relations, args.baseline_prompts, args.length,
                                  args.repeats, args.surgery)))
        return
    if args.side == "peer":
        print(json.dumps(peer(size, args.relations, args.prompts, args.batch, args.length,
                              args.repeats, args.dtype, args.peer_compiled,
                              args.peer_compile_mode, args.peer_warm_cache,
                              args.peer_allocator == "heap")))
        return

    common = ["--size", args.size, "--relations", str(args.relations), "--prompts",
              str(args.prompts), "--baseline-prompts", str(args.baseline_prompts), "--batch",
              str(args.batch), "--length", str(args.length), "--repeats", str(args.repeats),
              "--dtype", args.dtype, "--cpu-devices", str(args.cpu_devices)]
    surgeries = () if args.no_baseline else ("per_prompt", "per_relation")
    peer_sides = [] if args.peer == "none" else \
        list(PEER_SIDES) if args.peer == "both" else [args.peer]
    peer_common = common + ["--peer-allocator", args.peer_allocator] + \
        (["--peer-warm-cache"] if args.peer_warm_cache else []) + \
        (["--peer-compile-mode", args.peer_compile_mode] if args.peer_compile_mode else [])
    runs: dict[str, list[dict]] = {k: [] for k in ("ours", *surgeries,
                                                   *(f"peer_{p}" for p in peer_sides))}
    for _ in range(args.rounds):
        runs["ours"].append(run_side("bench.eval_throughput", "ours", common, args.quiet_wait))
        for surgery in surgeries:
            runs[surgery].append(run_side("bench.eval_throughput", "torch",
                                          [*common, "--surgery", surgery], args.quiet_wait))
        for key in peer_sides:
            flags = ["--peer-compiled"] if PEER_SIDES[key] else []
            runs[f"peer_{key}"].append(run_side("bench.eval_throughput", "peer",
                                                peer_common + flags, args.quiet_wait))

    rates = {k: [r["evaluated"] / r["seconds"] for r in v] for k, v in runs.items()}
    print(f"eval throughput: size={args.size}, R={args.relations}, L={args.length}, masked "
          f"layers {list(size['layers'])}; full model + binary subnetworks, each prompt counted "
          f"twice; ours and the peer {args.prompts} prompts/relation in batches of "
          f"{args.batch} ({args.dtype}), baseline {args.baseline_prompts} prompts/relation one "
          "at a time")
    print(f"machine: {machine()}; {args.rounds} rounds, medians")
    print(f"{'':<48}{'prompts/s':>11}{'ours/it':>9}{'peak RSS MB':>13}")
    names = {"ours": "lamp-jax (batched, jitted)",
             "per_prompt": "reference (one at a time, surgery per prompt)",
             "per_relation": "reference variant (surgery per relation)",
             "peer_eager": "peer torch eager (batched, [R, in, out])",
             "peer_compiled": "peer torch compiled (batched, [R, in, out])"}
    ours_rate = float(np.median(rates["ours"]))
    for key in runs:
        ratio = "" if key == "ours" else f"{ours_rate / np.median(rates[key]):.2f}x"
        print(f"{names[key]:<48}{np.median(rates[key]):>11.1f}{ratio:>9}"
              f"{max(r['peak_rss_mb'] for r in runs[key]):>13.0f}")
    print(f"per round, ours prompts/s: {' '.join(f'{x:.0f}' for x in rates['ours'])}")
    for key in runs:
        if key == "ours":
            continue
        per_round = [a / b for a, b in zip(rates["ours"], rates[key], strict=True)]
        print(f"ratio per round vs {key}: {' '.join(f'{x:.2f}' for x in per_round)} "
              f"({key} prompts/s: {' '.join(f'{x:.0f}' for x in rates[key])})")
    if peer_sides:
        best = [max(rates[f"peer_{p}"][i] for p in peer_sides) for i in range(args.rounds)]
        per_round = [a / b for a, b in zip(rates["ours"], best, strict=True)]
        against = ("" if args.no_baseline else "; against the reference: "
                   f"{ours_rate / np.median(rates['per_prompt']):.1f}x")
        print(f"ratio ours/best peer: {np.median(per_round):.2f}x (median of rounds; rounds "
              f"{' '.join(f'{x:.2f}' for x in per_round)}){against}")
        print("peer first call (compile for the compiled side, not timed): " + ", ".join(
            f"{p} {np.median([r['compile_s'] for r in runs[f'peer_{p}']]):.1f} s"
            for p in peer_sides)
            + f"; one glibc heap: {runs[f'peer_{peer_sides[0]}'][0]['one_heap']}")
    print(f"CPU share used by other processes during each run ({' / '.join(runs)}):"
          + "".join(" " + "/".join(f"{r['others_cpu']:.0%}" for r in group)
                    for group in zip(*runs.values(), strict=True)))
    a = runs["ours"][0]
    # Per prompt, ours runs the frozen prefix once and the layers above it twice.
    lowest = min(size["layers"])
    upper = eval_flops_per_prompt(size, args.length, start_layer=lowest)
    prefix = eval_flops_per_prompt(size, args.length, head_positions=0) - \
        eval_flops_per_prompt(size, args.length, start_layer=lowest, head_positions=0)
    flops = (prefix + 2 * upper) / 2 * ours_rate
    print(f"ours: compile {np.median([r['compile_s'] for r in runs['ours']]):.1f} s (not timed); "
          f"recompiled while timing: {any(r['recompiled'] for r in runs['ours'])}; "
          f"{flops / 1e9:.1f} GFLOP/s; device {a['device']}, mesh {a['mesh']} (--cpu-devices "
          f"{args.cpu_devices}), relations per device at a time: {a['relation_chunk'] or 'all'}, "
          f"peak device MB {max(r['peak_device_mb'] for r in runs['ours']):.0f}")


if __name__ == "__main__":
    main()
