"""Training throughput: lamp-jax's vmapped step vs the reference algorithm in PyTorch.

    python -m bench.train_throughput                   # small config, 2-core CPU, ~1 minute
    python -m bench.train_throughput --size base --relations 16 --batch 32 --length 20 \\
        --dtype bfloat16 --peak-tflops 989             # bert-base shapes on one H100

Three contenders: lamp-jax, the reference algorithm re-created in PyTorch (``baseline_torch.py``,
the weakest peer) and the strong PyTorch peer (``peer_torch.py``: one relation axis, batched
matmuls, frozen prefix cached, the last layer and head at [MASK] only, fused Adam), eager and
``torch.compile``-d. All use the same model shapes, relations, batch, length, masked layers and
matrices, the same mask mode, and Adam with per-relation clipping. Each side runs in its own
process (separate peak memory); the sides alternate for ``--rounds`` rounds, and the figures are
medians over rounds of each side's median step time. Relation-examples per second = R * B / step
time. Ours and the peer are charged their share of the one-off frozen-prefix pass.
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
    add_step_arguments,
    jax_device_summary,
    machine,
    matmul_peak_gflops,
    median_time,
    model_shape,
    peak_rss_mb,
    random_batch,
    run_side,
    synthetic_run,
    time_steps,
    torch_batches,
    torch_bert_kwargs,
    torch_setup,
    train_flops_per_example,
)

# Untimed steps before timing, on each side. Measured with bert-base shapes on the CPU: the two
# steps after the compiling one took 1.9 s each, later ones 0.5 s (first-touch page faults of the
# step's buffers).
WARMUP_STEPS = 3


def setup_step(size: dict, relations: int, batch: int, length: int, dtype: str, mode: str,
               relation_chunk: int | None, cache_prefix: bool,
               relation_parallelism: int | None = None, moment_dtype: str = "float32") -> dict:
    """Our jitted step, its state, frozen params and one batch, as train.py's setup builds
    them and places them (:func:`bench.common.synthetic_run`: the run's own setup, inert
    relation slots and donation rule included); ``prefix_s`` is the time of the frozen-prefix
    pass for the batch's prompts."""
    from lamp_jax.prefix import default_chunk, prefix_hidden_states

    run = synthetic_run(size, relations, batch, length, dtype, mode, relation_chunk,
                        cache_prefix, relation_parallelism, moment_dtype)
    prefix_s = 0.0
    if run.start_layer:
        # The run computes the frozen layers once per prompt before training; time that for
        # this step's R * B prompts, so it can be charged to each step of a run's epochs. In
        # chunks of at most R * B prompts: a run pads only its last chunk, but one step's
        # prompts padded to a whole chunk were charged the work of the padding too (bert-base
        # shapes, 4 x 8 prompts on a CPU: 128 encoded, 1.23 s instead of 0.3 s).
        prompts = run.data.splits["train"]
        chunk = min(default_chunk(), len(prompts))
        encode = lambda: prefix_hidden_states(  # noqa: E731  (returns host arrays)
            run.frozen, prompts.input_ids, prompts.attention_mask, model_config=run.mlm.config,
            stop_layer=run.start_layer, dtype=run.dtype, chunk=chunk, mesh=run.mesh)
        encode()
        prefix_s = median_time(encode, 3)
    local = run.slots // run.mesh.shape["relation"]
    return {"step": run.step_fn, "state": run.init_state(log=lambda *_: None),
            "params": run.frozen, "data": run.train_batch(0), "lr": run.learning_rate,
            "prefix_s": prefix_s,
            "mesh": run.mesh, "slots": run.slots,
            "relation_chunk": run.chunk if run.chunk and run.chunk < local else None,
            "run": run}


def ours(size: dict, relations: int, batch: int, length: int, repeats: int, dtype: str,
         mode: str, relation_chunk: int | None, cache_prefix: bool, cpu_devices: int,
         relation_parallelism: int | None = None, moment_dtype: str = "float32") -> dict:


    from lamp_jax.placement import use_cpu_devices

    use_cpu_devices(cpu_devices)  # as train.py does, before JAX starts

    built = setup_step(size, relations, batch, length, dtype, mode, relation_chunk, cache_prefix,
                       relation_parallelism, moment_dtype)
    step, state, params, data, lr = (built[k] for k in ("step", "state", "params", "data",
                                                         "lr"))
    prefix_s = built["prefix_s"]

    # The first steps after compiling fault in memory: WARMUP_STEPS - 1 more go untimed.
    compiles = CompileCounter()
    seconds, compile_s = time_steps(step, state, (params, data, lr), repeats,
                                    warmup=WARMUP_STEPS - 1, during=compiles)
    summary = jax_device_summary()
    return {"step_s": seconds, "mesh": dict(built["mesh"].shape), "slots": built["slots"],
            "relation_chunk": built["relation_chunk"], "prefix_s": prefix_s,
            "compile_s": compile_s,
            "peak_rss_mb": peak_rss_mb(),
            # Compiled once, never again: the timed steps reuse the first executable.
            "recompiled": compiles.count > 0,
            "matmul_peak_gflops": matmul_peak_gflops() if summary["device"].startswith("cpu")
            else 0.0, **summary}


def baseline(size: dict, relations: int, batch: int, length: int, repeats: int,
             mode: str) -> dict:
    import torch

    from bench.baseline_torch import ReferenceLAMP, reference_bert
    from lamp_jax.models import FAMILIES

    device = torch_setup()
    torch.manual_seed(0)
    model = reference_bert(torch_bert_kwargs(size, length)).to(device)
    lamp = ReferenceLAMP(model, relations, size["layers"], list(FAMILIES["bert"].matrices),
                         mode=mode, total_steps=10_000)
    batches = torch_batches(random_batch(relations, batch, length, size["vocab_size"]), device)
    for _ in range(WARMUP_STEPS):  # allocator, kernels
        lamp.train_step(batches)

    def one():
        lamp.train_step(batches)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_time(one, repeats)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"step_s": seconds, "peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_gpu,
            "device": f"torch {device}:{name}", "threads": torch.get_num_threads()}


def peer(size: dict, relations: int, batch: int, length: int, repeats: int, dtype: str,
         mode: str, compiled: bool, compile_mode: str | None = None,
         warm_cache: bool = False, one_heap: bool = True) -> dict:
    """The strong PyTorch peer's step (``bench/peer_torch.py``), eager or compiled, with its
    frozen-prefix pass timed as ours is. ``compile_s`` is the first call's wall time (for the
    compiled side: Dynamo, AOTAutograd and Inductor for forward, backward and update), in a
    fresh Inductor cache unless ``warm_cache`` (lamp-jax's side compiles without a persistent
    cache too)."""
    if compiled and not warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="peer_inductor_")
    import time

    import torch

    from bench.peer_torch import PeerLAMP, PeerShape, PeerWeights, keep_one_heap

    heap = keep_one_heap() if one_heap else False  # before torch's first parallel op
    device = torch_setup()
    if device == "cuda":
        # XLA runs float32 matmuls on TF32 units by default on Hopper; so does the peer.
        torch.set_float32_matmul_precision("high")
    shape = PeerShape(**model_shape(size), max_position_embeddings=max(512, length))
    lamp = PeerLAMP(PeerWeights.random(shape), relations, size["layers"], mode=mode,
                    device=device, dtype=getattr(torch, dtype), compile=compiled,
                    compile_mode=compile_mode, total_steps=10_000)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    data = lamp.batch(random_batch(relations, batch, length, size["vocab_size"]))

    def encode():
        lamp.prefix(data["input_ids"], data["attention_mask"])
        sync()

    encode()
    prefix_s = median_time(encode, 3)

    def one():
        lamp.train_step(data)
        sync()

    start = time.perf_counter()
    one()
    compile_s = time.perf_counter() - start
    for _ in range(WARMUP_STEPS - 1):
        one()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_time(one, repeats)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"step_s": seconds, "prefix_s": prefix_s, "compile_s": compile_s,
            "peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_gpu,
            "device": f"torch {device}:{name}", "threads": torch.get_num_threads(),
            "one_heap": heap}


PEER_SIDES = {"eager": False, "compiled": True}


def _fmt(values, digits: int = 4) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--repeats", type=int, default=50, help="timed steps of ours and the peer")
    parser.add_argument("--baseline-repeats", type=int, default=12, help="timed baseline steps")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of all sides")
    parser.add_argument("--relation-chunk", type=int, default=0,
                        help="ours: vmap this many relations per device at a time (0 = as "
                        "train.py chooses with memory to spare: all at once)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="device peak for MFU (e.g. 989 for H100 SXM bf16 dense); on a CPU "
                        "the default is the measured float32 rate of a 2048^3 matmul")
    parser.add_argument("--no-cache-prefix", action="store_true",
                        help="ours: run the frozen layers below the masked ones in every step")
    parser.add_argument("--epochs", type=int, default=6,
                        help="ours and the peer: the one-off frozen-prefix cost is charged to "
                        "the steps of this many epochs (the paper trains 6)")
    add_cpu_devices_argument(parser)
    parser.add_argument("--relation-parallelism", type=int, default=0,
                        help="ours: devices on the relation axis (0 = as train.py chooses; 1 = "
                        "what it chose for 13 relations on 2 devices before inert padding)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the reference re-creation (baseline_torch.py)")
    add_peer_arguments(parser)
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each run, wait up to this many seconds for idle CPUs")
    parser.add_argument("--side", choices=("both", "ours", "torch", "peer"), default="both")
    args = parser.parse_args()
    size = SIZES[args.size]
    shape = (args.relations, args.batch, args.length)
    if args.side == "ours":
        print(json.dumps(ours(size, *shape, args.repeats, args.dtype, args.mode,
                              args.relation_chunk or None, not args.no_cache_prefix,
                              args.cpu_devices, args.relation_parallelism or None,
                              args.moment_dtype)))
        return
    if args.side == "torch":
        print(json.dumps(baseline(size, *shape, args.baseline_repeats, args.mode)))
        return
    if args.side == "peer":
        print(json.dumps(peer(size, *shape, args.repeats, args.dtype, args.mode,
                              args.peer_compiled, args.peer_compile_mode,
                              args.peer_warm_cache, args.peer_allocator == "heap")))
        return

    common = ["--size", args.size, "--relations", str(args.relations), "--batch",
              str(args.batch), "--length", str(args.length), "--repeats", str(args.repeats),
              "--baseline-repeats", str(args.baseline_repeats), "--dtype", args.dtype,
              "--mode", args.mode, "--relation-chunk", str(args.relation_chunk),
              "--cpu-devices", str(args.cpu_devices),
              "--relation-parallelism", str(args.relation_parallelism),
              "--moment-dtype", args.moment_dtype] + \
        (["--no-cache-prefix"] if args.no_cache_prefix else [])
    peer_common = common + ["--peer-allocator", args.peer_allocator] + \
        (["--peer-warm-cache"] if args.peer_warm_cache else []) + \
        (["--peer-compile-mode", args.peer_compile_mode] if args.peer_compile_mode else [])
    peer_sides = [] if args.peer == "none" else \
        list(PEER_SIDES) if args.peer == "both" else [args.peer]
    runs_a, runs_b = [], []
    runs_p: dict[str, list[dict]] = {k: [] for k in peer_sides}
    for _ in range(args.rounds):
        runs_a.append(run_side("bench.train_throughput", "ours", common, args.quiet_wait))
        if not args.no_baseline:
            runs_b.append(run_side("bench.train_throughput", "torch", common,
                                   args.quiet_wait))
        for key in peer_sides:
            flags = ["--peer-compiled"] if PEER_SIDES[key] else []
            runs_p[key].append(run_side("bench.train_throughput", "peer", peer_common + flags,
                                        args.quiet_wait))

    examples = args.relations * args.batch
    cached = not args.no_cache_prefix
    flops = {"ours": train_flops_per_example(size, args.length, cached_prefix=cached) * examples,
             "baseline": train_flops_per_example(size, args.length, cached_prefix=False,
                                                 rows_only=False, head_positions=args.length)
             * examples,
             # The peer skips what ours skips: prefix cached, last layer and head at [MASK].
             "peer": train_flops_per_example(size, args.length) * examples}
    # Ours and the peer per step: the step itself plus its share of the one-off prefix pass.
    for r in runs_a + [r for runs in runs_p.values() for r in runs]:
        r["charged_s"] = r["step_s"] + r["prefix_s"] / args.epochs
    print(f"train throughput: size={args.size}, R={args.relations}, B={args.batch}, "
          f"L={args.length}, masked layers {list(size['layers'])} (all 6 matrices), "
          f"{args.mode} masks, ours and the peer in {args.dtype}"
          + (f", relation_chunk={args.relation_chunk}" if args.relation_chunk else ""))
    print(f"machine: {machine()}; {args.rounds} rounds, medians")
    if cached:
        print(f"ours: frozen layers 0..{min(size['layers']) - 1} computed once per prompt; that "
              f"pass, {np.median([r['prefix_s'] for r in runs_a]):.4f} s for one step's "
              f"{examples} prompts, is charged 1/{args.epochs} per step ({args.epochs} epochs); "
              "the peer likewise"
              + "".join(f" (peer {k}: {np.median([r['prefix_s'] for r in v]):.4f} s)"
                        for k, v in runs_p.items()))
    if peer_sides and args.moment_dtype != "float32":
        print(f"note: ours stores Adam's moments in {args.moment_dtype}, the peer in float32")
    print(f"{'':<26}{'step s':>10}{'rel-ex/s':>11}{'GFLOP':>8}{'GFLOP/s':>10}"
          f"{'peak RSS MB':>13}{'peak dev MB':>13}")
    rows = [("lamp-jax (vmapped step)", runs_a, "charged_s", flops["ours"])]
    if runs_b:
        rows.append(("reference (torch loop)", runs_b, "step_s", flops["baseline"]))
    rows += [(f"peer torch {k}", v, "charged_s", flops["peer"]) for k, v in runs_p.items()]
    for name, runs, key, work in rows:
        step_s = float(np.median([r[key] for r in runs]))
        print(f"{name:<26}{step_s:>10.4f}{examples / step_s:>11.1f}{work / 1e9:>8.2f}"
              f"{work / step_s / 1e9:>10.1f}{max(r['peak_rss_mb'] for r in runs):>13.0f}"
              f"{max(r['peak_device_mb'] for r in runs):>13.0f}")
    a_step = float(np.median([r["step_s"] for r in runs_a]))
    print(f"per round, ours step s (prefix share included): {_fmt(r['charged_s'] for r in runs_a)}")
    against = ""
    if runs_b:
        ratios = [b["step_s"] / a["charged_s"] for a, b in zip(runs_a, runs_b, strict=True)]
        print(f"per round, baseline step s: {_fmt(r['step_s'] for r in runs_b)}")
        print(f"throughput ratio ours/baseline: {np.median(ratios):.2f}x (median of rounds; "
              f"rounds {_fmt(ratios, 2)})")
        against = f"; against the reference: {np.median(ratios):.2f}x"
    for key, runs in runs_p.items():
        ratios = [p["charged_s"] / a["charged_s"] for a, p in zip(runs_a, runs, strict=True)]
        print(f"per round, peer {key} step s (prefix share included): "
              f"{_fmt(r['charged_s'] for r in runs)}; ours/peer {key}: "
              f"{np.median(ratios):.2f}x (rounds {_fmt(ratios, 2)})")
    if runs_p:
        # Per round, the faster peer side of that round: what a PyTorch user would pick.
        best = [min(r[i]["charged_s"] for r in runs_p.values()) for i in range(args.rounds)]
        ratios = [p / a["charged_s"] for a, p in zip(runs_a, best, strict=True)]
        print(f"throughput ratio ours/best peer: {np.median(ratios):.2f}x (median of rounds; "
              f"rounds {_fmt(ratios, 2)}){against}")
        print("peer first call (compile for the compiled side, not timed): "
              + ", ".join(f"{k} {np.median([r['compile_s'] for r in v]):.1f} s"
                          for k, v in runs_p.items())
              + f"; torch threads {next(iter(runs_p.values()))[0]['threads']}, device "
              f"{next(iter(runs_p.values()))[0]['device']}, one glibc heap (no page faults): "
              f"{next(iter(runs_p.values()))[0]['one_heap']}")
    sides = [runs_a] + ([runs_b] if runs_b else []) + list(runs_p.values())
    names = "ours" + (" / baseline" if runs_b else "") + "".join(f" / peer {k}" for k in runs_p)
    print(f"CPU share used by other processes during each run ({names}):"
          + "".join(" " + "/".join(f"{r['others_cpu']:.0%}" for r in group)
                    for group in zip(*sides, strict=True)))
    print(f"ours: compile {np.median([r['compile_s'] for r in runs_a]):.1f} s (once, not timed); "
          f"recompiled while timing: {any(r['recompiled'] for r in runs_a)}; "
          f"device {runs_a[0]['device']}, mesh {runs_a[0]['mesh']} (--cpu-devices "
          f"{args.cpu_devices}), relation slots {runs_a[0]['slots']} "
          f"({runs_a[0]['slots'] - args.relations} inert), relations per device at a time: "
          f"{runs_a[0]['relation_chunk'] or 'all'}")
    peak = args.peak_tflops * 1e3 or float(np.median([r["matmul_peak_gflops"] for r in runs_a]))
    achieved = flops["ours"] / a_step / 1e9
    source = "given" if args.peak_tflops else "measured 2048^3 float32 matmul"
    what = ("matmul FLOPs ours executes per step (bench.common.train_flops_per_example; the "
            "work it skips is not counted)")
    if peak:
        print(f"{what}: {flops['ours'] / 1e9:.2f} G at {achieved:.1f} GFLOP/s = MFU "
              f"{100 * achieved / peak:.1f}% of {peak:.0f} GFLOP/s ({source})")
    else:
        print(f"{what}: {flops['ours'] / 1e9:.2f} G at {achieved:.1f} GFLOP/s "
              "(pass --peak-tflops for MFU)")


if __name__ == "__main__":
    main()
