"""Where a training step's time goes, on both sides: lamp-jax and the strong PyTorch peer,
piece by piece, beside this machine's limits.

    python -m bench.profile_sides                              # small config, 2-core CPU
    python -m bench.profile_sides --size base --relations 4 --batch 8 --length 20 --repeats 3

Each side runs in its own process. Every piece is timed alone (median wall time), over all R
relations at once, in the step's shapes and dtype:

* ``noise``: the uniforms of the stochastic masks, written out (in a step they are drawn inside
  the op that uses them on our side);
* ``masks``: logits -> masked weights ``W * m`` of every masked matrix (``--mode``: the hard
  threshold, or the binary-concrete sample with its noise);
* ``fwd+bwd``: forward, loss and backward with respect to the masked weights (the model's
  matmuls and everything between them);
* ``ste bwd``: the gradient with respect to the masked weights -> the logits' gradient
  (``grad * W``; the concrete sample's derivative too in the stochastic mode);
* ``clip norm``: each relation's global gradient norm;
* ``adam``: clipping, Adam with per-relation state, the schedule and the keep-if-active
  (ours: the tail of ``lamp_jax.step.relation_update``; the peer's eager update);
* ``value+grad`` and ``step``: the whole gradient and the whole step as they really run (ours
  jitted as the trainer builds it, on ``--cpu-devices`` devices; the peer eager and compiled).

Pieces run alone lose the fusions across their borders, so they add up to more than the step.
The limits: float32 matmul rates of the step's shapes and of 2048^3 for both libraries, and the
memory bandwidth of a large copy; ``floor`` is a piece's bytes at that bandwidth (elementwise
pieces are memory-bound). A ``torch.profiler`` table of the peer's eager step by op category
follows (``python -m bench.profile_step`` gives lamp-jax's trace by category).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from bench.common import (
    SIZES,
    add_cpu_devices_argument,
    add_step_arguments,
    machine,
    median_time,
    model_shape,
    random_batch,
    run_side,
)

PIECES = ("noise", "masks", "fwd+bwd", "ste bwd", "clip norm", "adam", "value+grad", "step")


def _bytes_per_logit(piece: str, compute_bytes: int) -> float:
    """Bytes a piece must move per mask logit (its memory-bound floor): float32 logits,
    gradients and moments; masked weights in the compute dtype. The frozen weights, read once
    for all relations, are left out."""
    return {"noise": 4, "masks": 4 + compute_bytes, "ste bwd": compute_bytes + 4,
            "clip norm": 4, "adam": 16 + 12 + 4}.get(piece, 0.0)


def ours(size: dict, relations: int, batch: int, length: int, dtype: str, mode: str,
         repeats: int, cpu_devices: int) -> dict[str, Any]:
    from lamp_jax.parallel import use_cpu_devices

    use_cpu_devices(cpu_devices)  # as train.py does, before JAX starts
    import jax
    import jax.numpy as jnp
    import optax

    from bench.train_throughput import WARMUP_STEPS, setup_step
    from lamp_jax import threefry
    from lamp_jax.masks import MaskMode, compute_masks
    from lamp_jax.models import ModelConfig, mlm_forward
    from lamp_jax.step import (
        LossConfig,
        OptimConfig,
        learning_rate,
        make_optimizer,
        relation_loss,
    )

    built = setup_step(size, relations, batch, length, dtype, mode, None, cache_prefix=True)
    step, state = built["step"], built["state"]
    lowest = min(size["layers"])
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    mask_mode, optim = MaskMode(mode), OptimConfig()
    config = ModelConfig(**model_shape(size), max_position_embeddings=max(512, length))
    # The pieces run on one device, every relation at once (the step's arrays may be spread
    # over several devices).
    one = jax.devices()[0]
    put = lambda t: jax.device_put(jax.device_get(t), one)  # noqa: E731
    logits, params, data = put(state.mask_logits), put(built["params"]), put(built["data"])
    opt_state, steps, total = put(state.opt_state), put(state.relation_steps), \
        put(state.total_steps)
    rngs = jax.random.split(jax.random.key(0), relations)

    def keys_of(path) -> list[str]:
        return [k.key for k in path]

    def kernel_at(keys: list[str]):
        node = params
        for k in keys:
            node = node[k]
        return node

    kernels = jax.tree_util.tree_map_with_path(lambda p, _: kernel_at(keys_of(p)), logits)

    def with_kernels(masked):
        """The frozen params with one relation's masked kernels put in."""
        out = jax.tree.map(lambda x: x, params)
        for path, w in jax.tree_util.tree_flatten_with_path(masked)[0]:
            *head, last = keys_of(path)
            node = out
            for k in head:
                node = node[k]
            node[last] = w
        return out

    def masks_fn(g, key):
        m = compute_masks(g, mask_mode, key)
        return jax.tree.map(lambda mm, w: w * mm.astype(w.dtype), m, kernels)

    def noise_fn(g, key):  # as masks.compute_masks draws it: one key per leaf
        leaves, treedef = jax.tree.flatten(g)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [
            threefry.uniform(k, x.shape, x.dtype, 1e-6, 1 - 1e-6)
            for k, x in zip(keys, leaves, strict=True)])

    def loss_w(masked, b):  # relation_loss as a function of the masked kernels
        out = mlm_forward(with_kernels(masked), b["input_ids"], b["attention_mask"],
                          config=config, output_positions=b["mask_pos"], dtype=compute,
                          hidden=b["hidden"], start_layer=lowest)["logits"]
        ce = optax.softmax_cross_entropy_with_integer_labels(out, b["obj_id"])
        w = b["weight"]
        return jnp.sum(ce * w) / jnp.maximum(w.sum(), 1.0)

    def update_fn(g, opt, count_steps, total_steps, grads, count):
        # The tail of lamp_jax.step.relation_update, after the gradient.
        updates, new_opt = make_optimizer(optim).update(grads, opt, g)
        lr = learning_rate(count_steps, total_steps, optim)
        new = jax.tree.map(lambda x, u: x - lr * u.astype(x.dtype), g, updates)
        active = (count > 0) & jnp.isfinite(optax.global_norm(grads))
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(active, x, y), a, b)  # noqa: E731
        return keep(new, g), keep(new_opt, opt), count_steps + active.astype(jnp.int32)

    masks = jax.jit(jax.vmap(masks_fn))
    masked = masks(logits, rngs)
    fwd_bwd = jax.jit(jax.vmap(jax.grad(loss_w)))
    grads_w = fwd_bwd(masked, data)
    if mode == "deterministic":  # identity through the threshold: grad * W
        ste = jax.jit(lambda gw: jax.tree.map(lambda x, w: (x * w).astype(jnp.float32), gw,
                                              kernels))
        ste_args = (grads_w,)
    else:  # grad * W * m (1 - m) / tau, with the sample m
        samples = jax.jit(jax.vmap(lambda g, k: compute_masks(g, mask_mode, k)))(logits, rngs)
        ste = jax.jit(lambda gw, m: jax.tree.map(
            lambda x, w, s: (x * w).astype(jnp.float32) * s * (1 - s) / mask_mode.tau,
            gw, kernels, m))
        ste_args = (grads_w, samples)
    grads = ste(*ste_args)
    norm = jax.jit(jax.vmap(optax.global_norm))
    update = jax.jit(jax.vmap(update_fn))
    count = data["weight"].sum(-1)
    loss_config = LossConfig(mask_mode, compute_dtype=compute, start_layer=lowest)
    value_grad = jax.jit(jax.vmap(jax.value_and_grad(
        lambda g, b, k: relation_loss(g, params, b, k, model_config=config,
                                      loss_config=loss_config), has_aux=True)))
    noise = jax.jit(jax.vmap(noise_fn))
    calls = {
        "noise": lambda: noise(logits, rngs),
        "masks": lambda: masks(logits, rngs),
        "fwd+bwd": lambda: fwd_bwd(masked, data),
        "ste bwd": lambda: ste(*ste_args),
        "clip norm": lambda: norm(grads),
        "adam": lambda: update(logits, opt_state, steps, total, grads, count),
        "value+grad": lambda: value_grad(logits, data, rngs),
    }
    out: dict[str, Any] = {}
    for name, fn in calls.items():
        for _ in range(2):  # compile, then first-touch
            jax.block_until_ready(fn())
        out[name] = median_time(lambda fn=fn: jax.block_until_ready(fn()), repeats)

    def full():
        nonlocal state
        state, _ = step(state, built["params"], built["data"])
        jax.block_until_ready(state.mask_logits)

    for _ in range(WARMUP_STEPS):
        full()
    out["step"] = median_time(full, repeats)
    out["step_devices"] = dict(built["mesh"].shape)
    return out


def peer(size: dict, relations: int, batch: int, length: int, dtype: str, mode: str,
         repeats: int, compiled_step: bool, one_heap: bool = True) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.common import torch_setup
    from bench.peer_torch import (
        ConcreteMaskedWeights,
        PeerLAMP,
        PeerShape,
        PeerWeights,
        StraightThroughMaskedWeights,
        _segments,
        forward_from,
        keep_one_heap,
    )

    heap = keep_one_heap() if one_heap else False  # as the throughput benchmarks' peer
    device = torch_setup()
    shape = PeerShape(**model_shape(size), max_position_embeddings=max(512, length))
    weights = PeerWeights.random(shape)
    lamp = PeerLAMP(weights, relations, size["layers"], mode=mode, device=device,
                    dtype=getattr(torch, dtype))
    data = lamp.batch(random_batch(relations, batch, length, shape.vocab_size))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = lamp.logits.detach()
    w = lamp.w_flat
    noise = torch.rand_like(g)
    with torch.no_grad():
        masked = lamp._masked_weights(g, noise)
    # The masked weights as leaves of their own: forward and backward with respect to them.
    leaves = [t.clone().requires_grad_(True) for layer in masked.values() for t in layer.values()]

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        out = forward_from(data["hidden"], data["attention_mask"], data["mask_pos"], lamp.fw,
                           lamp.layers[0], lamp._by_layer(leaves))
        r, b, v = out.shape
        ce = torch.nn.functional.cross_entropy(out.reshape(r * b, v),
                                               data["obj_id"].reshape(-1), reduction="none")
        ((ce.view(r, b) * data["weight"]).sum(1) / data["weight"].sum(1)).sum().backward()
        return [t.grad for t in leaves]

    grads_w = fwd_bwd()

    class Ctx:  # what a Function's backward reads from its context
        def __init__(self, *saved, **attrs):
            self.saved_tensors = saved
            self.__dict__.update(attrs)

    if mode == "deterministic":
        ctx = Ctx(w, None, layout=lamp.layout, sigmoid_grad=False)
        ste = lambda: StraightThroughMaskedWeights.backward(ctx, *grads_w)  # noqa: E731
    else:
        samples = [torch.sigmoid((x + torch.logit(u, 1e-6)) / lamp.tau)
                   for x, u in zip(_segments(g, lamp.layout), _segments(noise, lamp.layout),
                                   strict=True)]
        ctx = Ctx(w, *samples, layout=lamp.layout, tau=lamp.tau)
        ste = lambda: ConcreteMaskedWeights.backward(ctx, *grads_w)  # noqa: E731
    grad = ste()[0]
    losses = torch.ones(relations, device=device)
    counts = data["weight"].sum(1)
    state = [t.clone() for t in (lamp.logits.detach(), lamp.exp_avg, lamp.exp_avg_sq,
                                 lamp.steps)]

    def adam():
        lamp._fused_update(state[0], grad.clone(), state[1], state[2], state[3], lamp.total,
                           lamp.peak, losses, counts)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    calls = {
        "noise": lambda: torch.rand_like(g),
        "masks": no_grad(lambda: lamp._masked_weights(g, None)),
        "fwd+bwd": fwd_bwd,
        "ste bwd": ste,
        "clip norm": lambda: torch.linalg.vector_norm(grad, dim=1),
        "adam": adam,
        "value+grad": lambda: lamp.losses_and_grads(data),
        "step": lambda: lamp.train_step(data),
    }
    out: dict[str, Any] = {}
    for name, fn in calls.items():
        def timed(fn=fn):
            fn()
            sync()
        timed()
        timed()
        out[name] = median_time(timed, repeats)
    # Adam alone: the fused update minus its norm (it computes the norm first).
    out["adam"] = max(out["adam"] - out["clip norm"], 0.0)
    if compiled_step:
        lamp_c = PeerLAMP(weights, relations, size["layers"], mode=mode, device=device,
                          dtype=getattr(torch, dtype), compile=True)
        for _ in range(3):
            lamp_c.train_step(data)
        sync()
        out["step compiled"] = median_time(lambda: (lamp_c.train_step(data), sync()), repeats)
    # The eager step by op category (self time summed over the ops of 3 steps, per step).
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            lamp.train_step(data)
        sync()
    categories: dict[str, float] = {}
    for event in prof.key_averages():
        categories[_category(event.key)] = categories.get(_category(event.key), 0.0) + \
            event.self_cpu_time_total / 3 / 1e6
    out["profile"] = dict(sorted(categories.items(), key=lambda kv: -kv[1]))
    out["threads"] = torch.get_num_threads()
    out["one_heap"] = heap
    return out


def _category(op: str) -> str:
    """An op of the peer's eager step -> what it is part of."""
    table = (
        (("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm"), "matmuls"),
        (("scaled_dot_product",), "attention (fused kernel)"),
        (("_fused_adam_",), "adam (fused kernel)"),
        (("linalg_vector_norm",), "clip norm"),
        (("aten::uniform_", "aten::rand"), "noise"),
        (("aten::where", "aten::gt", "aten::logit", "aten::sigmoid", "aten::div_"),
         "masks: forming (where / sample)"),
        (("aten::cat",), "cat (backward of activation splits)"),
        (("layer_norm", "gelu", "softmax", "nll_loss", "cross_entropy"),
         "layer norm / gelu / loss"),
        (("aten::mul", "aten::add", "aten::sub", "aten::rsub"),
         "elementwise (STE backward, residuals)"),
        (("aten::copy_", "aten::fill_", "aten::zero", "aten::empty", "aten::clone",
          "aten::contiguous", "aten::to"), "copies / fills / allocation"),
    )
    for keys, name in table:
        if any(k in op for k in keys):
            return name
    return "other (dispatch, views, autograd)"


def limits(size: dict, relations: int, batch: int, length: int, repeats: int
           ) -> dict[str, Any]:
    """Matmul GFLOP/s (float32) of the step's largest batched shapes and of 2048^3, in torch
    and in XLA, and the bandwidth of a 1 GiB float32 copy (read + write)."""
    import jax
    import jax.numpy as jnp
    import torch

    from bench.common import torch_setup

    torch_setup()
    h, f = size["hidden_size"], size["intermediate_size"]
    n = batch * length
    shapes = {f"ffn_in fwd [{relations},{n},{h}]x[{h},{f}]": (relations, n, h, f),
              f"ffn_out fwd [{relations},{n},{f}]x[{f},{h}]": (relations, n, f, h),
              f"weight grad [{relations},{h},{n}]x[{n},{f}]": (relations, h, n, f),
              "2048^3": (1, 2048, 2048, 2048)}
    out: dict[str, Any] = {"matmul_gflops": {}}
    mm = jax.jit(jnp.matmul)
    for name, (r, a, k, b) in shapes.items():
        x, y = torch.randn(r, a, k), torch.randn(r, k, b)
        t = median_time(lambda x=x, y=y: torch.bmm(x, y), repeats * 3)
        xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
        mm(xj, yj).block_until_ready()
        tj = median_time(lambda xj=xj, yj=yj: mm(xj, yj).block_until_ready(), repeats * 3)
        flops = 2 * r * a * k * b
        out["matmul_gflops"][name] = {"torch": flops / t / 1e9, "xla": flops / tj / 1e9}
    big = torch.empty(2**28)  # 1 GiB of float32
    big.fill_(1.0)
    dst = torch.empty_like(big)
    t = median_time(lambda: dst.copy_(big), repeats)
    src = np.ones(2**28, np.float32)
    into = np.empty_like(src)
    tn = median_time(lambda: np.copyto(into, src), repeats)
    out["copy_gb_s"] = {"torch": 2 * 2**30 / t / 1e9, "numpy (one thread)": 2 * 2**30 / tn / 1e9}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compiled", action="store_true",
                        help="skip the compiled peer's step (its compile takes 20-60 s)")
    parser.add_argument("--peer-allocator", choices=("heap", "default"), default="heap",
                        help="as bench.train_throughput's")
    parser.add_argument("--side", choices=("both", "ours", "peer", "limits"), default="both")
    add_cpu_devices_argument(parser)
    args = parser.parse_args()
    size = SIZES[args.size]
    shape = (args.relations, args.batch, args.length)
    if args.side == "ours":
        print(json.dumps(ours(size, *shape, args.dtype, args.mode, args.repeats,
                              args.cpu_devices)))
        return
    if args.side == "peer":
        print(json.dumps(peer(size, *shape, args.dtype, args.mode, args.repeats,
                              not args.no_compiled, args.peer_allocator == "heap")))
        return
    if args.side == "limits":
        print(json.dumps(limits(size, *shape, args.repeats)))
        return

    common = [a for a in sys.argv[1:]]
    res = {side: run_side("bench.profile_sides", side, common, quiet_wait_s=30.0)
           for side in ("limits", "ours", "peer")}
    from bench.peer_torch import PeerShape

    p = PeerShape(**model_shape(size)).masked_size(size["layers"]) * args.relations
    gbps = res["limits"]["copy_gb_s"]["torch"]
    compute_bytes = 2 if args.dtype == "bfloat16" else 4
    print(f"profile of one training step, both sides: size={args.size}, R={args.relations}, "
          f"B={args.batch}, L={args.length}, {args.mode} masks, {args.dtype}; {p / 1e6:.1f} M "
          f"mask logits; {machine()}; medians of {args.repeats}")
    print(f"{'piece':<14}{'ours ms':>10}{'peer ms':>10}{'floor ms':>10}   (floor: bytes at "
          f"{gbps:.1f} GB/s, the measured copy bandwidth)")
    for piece in PIECES:
        floor = _bytes_per_logit(piece, compute_bytes) * p / (gbps * 1e9) * 1e3
        print(f"{piece:<14}{res['ours'][piece] * 1e3:>10.2f}{res['peer'][piece] * 1e3:>10.2f}"
              f"{(f'{floor:.2f}' if floor else ''):>10}")
    print(f"ours' step ran on devices {res['ours']['step_devices']} (--cpu-devices "
          f"{args.cpu_devices}); its pieces on one device")
    if "step compiled" in res["peer"]:
        print(f"peer step compiled: {res['peer']['step compiled'] * 1e3:.2f} ms")
    print(f"peer eager step by op category (torch.profiler self time, ms per step; "
          f"{res['peer']['threads']} threads; one glibc heap: {res['peer']['one_heap']}):")
    for name, seconds in res["peer"]["profile"].items():
        print(f"  {seconds * 1e3:8.2f}  {name}")
    print("float32 matmul GFLOP/s (torch / XLA):")
    for name, rates in res["limits"]["matmul_gflops"].items():
        print(f"  {name:<40}{rates['torch']:>8.1f} /{rates['xla']:>7.1f}")
    print("copy bandwidth GB/s (read + write of 1 GiB): " + ", ".join(
        f"{k} {v:.1f}" for k, v in res["limits"]["copy_gb_s"].items()))


if __name__ == "__main__":
    main()
