"""Device memory of one training step, from XLA's buffer assignment, without running it.

    python -m bench.memory_plan --size base --relations 16 --batch 32 --length 20 --dtype bfloat16
    python -m bench.memory_plan --size base --relations 16 --relation-chunk 4 --donate

Compiles our step (:func:`build_step`) for abstract inputs: nothing of
the model, the masks or the batch is allocated, so a laptop can plan a run for a GPU it does not
have. Prints the training state's size (mask logits and both Adam moments, float32, per
relation), then XLA's plan for this backend: the step's arguments, outputs, the outputs that
reuse donated argument buffers, and its temporaries. Peak = arguments + outputs - reused +
temporaries. The plan is the compiling backend's: run it on the machine you will train on (the
CPU and GPU compilers fuse differently, so their temporaries differ).
"""

from __future__ import annotations

import argparse
import math

from bench.common import SIZES, add_step_arguments, model_shape, random_batch

GIB = 2**30


def build_step(size: dict, relations: int, length: int, dtype: str, mode: str,
               relation_chunk: int | None, cache_prefix: bool, donate: bool | None = None,
               mesh=None, slots: int | None = None, moment_dtype: str = "float32"):
    """Our jitted step for abstract inputs, and ``init(rng) -> (frozen params, state)``, a pure
    function whose shapes ``jax.eval_shape`` gives without allocating anything. The step is
    :func:`lamp_jax.step.jit_train_step` with the loss and optimizer train.py's setup builds
    (:mod:`lamp_jax.setup`, which allocates the model; the benchmarks that run steps use
    it, :func:`bench.common.synthetic_run`). ``slots`` > ``relations``: inert relations pad
    the relation axis, as a run pads it to a multiple of its relation devices."""
    import jax
    import jax.numpy as jnp

    from lamp_jax.masks import MaskInit, MaskMode, MaskSpec, init_mask_logits
    from lamp_jax.models import FAMILIES, ModelConfig, init_params
    from lamp_jax.optim import OptimConfig, make_optimizer
    from lamp_jax.placement import state_shardings
    from lamp_jax.step import LossConfig, init_train_state, jit_train_step

    config = ModelConfig(**model_shape(size), max_position_embeddings=max(512, length))
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    mask_mode, optim = MaskMode(mode), OptimConfig(moment_dtype=moment_dtype)

    def init(rng: jax.Array):
        keys = jax.random.split(rng, 3)
        # As the trainer does: frozen weights in the compute dtype, mask logits and Adam in
        # float32.
        params = jax.tree.map(lambda x: x.astype(compute), init_params(config, keys[0]))
        spec = MaskSpec(size["layers"], FAMILIES["bert"].default_matrices)
        logits = init_mask_logits(spec, params, relations, MaskInit("normal", value=1.0),
                                  mask_mode, keys[1])
        extra = (slots or relations) - relations
        logits = jax.tree.map(lambda g: jnp.pad(g, [(0, extra)] + [(0, 0)] * (g.ndim - 1)),
                              logits)
        return params, init_train_state(logits, make_optimizer(optim), 10_000, keys[2])

    start_layer = min(size["layers"]) if cache_prefix else 0
    placement = None
    if mesh is not None:
        placement = state_shardings(jax.eval_shape(lambda: init(jax.random.key(0))[1]), mesh)
    step = jit_train_step(model_config=config, optim_config=optim, relation_chunk=relation_chunk,
                          loss_config=LossConfig(mask_mode, compute_dtype=compute,
                                                 start_layer=start_layer), donate=donate,
                          state_sharding=placement)
    return step, init, config, compute, start_layer


def _nbytes(tree) -> int:
    """Bytes of a pytree of arrays or ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp

    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def plan(size: dict, relations: int, batch: int, length: int, dtype: str = "float32",
         mode: str = "deterministic", relation_chunk: int | None = None,
         donate: bool | None = None, cache_prefix: bool = True,
         moment_dtype: str = "float32") -> dict:
    """XLA's memory plan of our step (bytes), and the size of the training state."""
    import jax
    import jax.numpy as jnp

    step, init, config, compute, start_layer = build_step(
        size, relations, length, dtype, mode, relation_chunk, cache_prefix, donate,
        moment_dtype=moment_dtype)
    params, state = jax.eval_shape(init, jax.random.key(0))
    data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in random_batch(relations, batch, length, config.vocab_size).items()}
    if start_layer:
        data["hidden"] = jax.ShapeDtypeStruct((relations, batch, length, config.hidden_size),
                                              compute)
    stats = step.lower(state, params, data, jax.ShapeDtypeStruct((), jnp.float32)).compile(
    ).memory_analysis()
    if stats is None:
        raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis")
    arguments, outputs = stats.argument_size_in_bytes, stats.output_size_in_bytes
    reused, temporaries = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    return {
        "backend": jax.default_backend(),
        "state": _nbytes((state.mask_logits, state.opt_state)),
        "frozen_params": _nbytes(params),
        "arguments": arguments, "outputs": outputs, "reused": reused,
        "temporaries": temporaries, "peak": arguments + outputs - reused + temporaries,
    }


def automatic_chunk(size: dict, relations: int, batch: int, length: int, dtype: str,
                    mode: str, moment_dtype: str, device_bytes: int) -> tuple[int | None, int]:
    """The relation chunk train.py picks on one accelerator of ``device_bytes`` (what its
    allocator may use): all relations at once when XLA's plan of that step fits in 80% of it
    (:func:`lamp_jax.placement.fastest_fitting_chunk`), else the memory-first estimate's;
    and the bytes the state and frozen weights leave for transients."""
    import jax
    import jax.numpy as jnp

    from lamp_jax.placement import (
        activation_bytes,
        budget_for,
        fastest_fitting_chunk,
        memory_relation_chunk,
        transient_bytes_per_relation,
    )

    _, init, *_ = build_step(size, relations, length, dtype, mode, None, True,
                             moment_dtype=moment_dtype)
    params, state = jax.eval_shape(init, jax.random.key(0))
    state_bytes = _nbytes((state.mask_logits, state.opt_state))
    left = device_bytes - state_bytes - _nbytes(params)
    mask_params = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(state.mask_logits))
    per_relation = transient_bytes_per_relation(
        mask_params, activation_bytes(batch * length, size["intermediate_size"],
                                      size["hidden_size"], jnp.dtype(dtype)),
        size["num_layers"])
    memory_first = memory_relation_chunk(relations, per_relation, budget_for(left, state_bytes))
    all_at_once = lambda: plan(size, relations, batch, length, dtype, mode, None, True,  # noqa: E731
                               moment_dtype=moment_dtype)["peak"]
    return fastest_fitting_chunk(memory_first, all_at_once, device_bytes, log=print), left


def fits_table(size: dict, relations: int, batch: int, length: int, dtype: str, mode: str,
               memories_gib: list[float]) -> None:
    """For each device memory and moment dtype: the automatic chunk and XLA's plan of the
    step with it (one compile per distinct chunk)."""
    print(f"automatic relation chunk and planned peak per device memory: masked layers "
          f"{list(size['layers'])}, R={relations}, B={batch}, L={length}, compute {dtype}, "
          f"{mode} masks")
    print(f"{'device GiB':>10} {'moments':>9} {'state GiB':>10} {'chunk':>6} "
          f"{'planned peak GiB':>17} {'peak / (state+frozen)':>22}  fits")
    plans: dict[tuple, dict] = {}
    for memory in memories_gib:
        for moment_dtype in ("float32", "bfloat16"):
            # JAX's GPU allocator takes 75% of it by default (XLA_PYTHON_CLIENT_MEM_FRACTION);
            # train.py asks XLA's plan of all relations at once first.
            usable = int(memory * GIB * 0.75)
            chunk, _ = automatic_chunk(size, relations, batch, length, dtype, mode,
                                       moment_dtype, usable)
            key = (chunk, moment_dtype)
            if key not in plans:
                plans[key] = plan(size, relations, batch, length, dtype, mode, chunk, True,
                                  moment_dtype=moment_dtype)
            p = plans[key]
            base = p["state"] + p["frozen_params"]
            print(f"{memory:>10.0f} {moment_dtype:>9} {p['state'] / GIB:>10.2f} "
                  f"{chunk or relations:>6} {p['peak'] / GIB:>17.2f} {p['peak'] / base:>22.2f}"
                  f"  {'yes' if p['peak'] <= usable else 'NO'}")


def state_table(model_config: str, first: int, last: int, matrices: list[str] | None,
                relations: int, batch: int, length: int, dtype: str,
                memories_gib: list[float]) -> None:
    """Any family's training state from its ``config.json`` alone (``jax.eval_shape``: nothing
    allocated): mask weights per relation, the state with float32 and bfloat16 moments, the
    frozen weights, and for each device memory how many relations fit at once beside the
    frozen weights and one relation's step transients (train.py's estimate,
    :func:`lamp_jax.placement.step_transient_bytes`), in JAX's default 75% of the card."""
    import json
    from pathlib import Path

    import jax
    import jax.numpy as jnp

    from lamp_jax.masks import MaskSpec
    from lamp_jax.models.registry import config_from_hf_dict, family_of
    from lamp_jax.placement import step_transient_bytes

    config = config_from_hf_dict(json.loads(Path(model_config).read_text()))
    family = family_of(config)
    shapes = jax.eval_shape(lambda: family.init_params(config, jax.random.key(0), 8))
    spec = MaskSpec.create(config, first, last, matrices)
    mask_params = 0
    for path in spec.paths():
        leaf = shapes
        for key in path:
            leaf = leaf[key]
        mask_params += math.prod(leaf.shape)
    item = jnp.dtype(dtype).itemsize
    frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) * item
    transients = step_transient_bytes(config, batch, length, mask_params, jnp.dtype(dtype))
    print(f"{Path(model_config).name} ({config.family}): masks on layers {first}..{last}, "
          f"{', '.join(spec.matrices)}: {mask_params / 1e6:.1f} M mask weights per relation; "
          f"frozen weights {frozen / 1e9:.2f} GB in {dtype}; one relation's step transients "
          f"{transients / 1e9:.2f} GB (B={batch}, L={length})")
    print(f"{'moments':>9} {'state/relation':>15} {f'state x {relations}':>12}  "
          + "  ".join(f"{m:g} GB: relations at once" for m in memories_gib))
    for moments, moment_bytes in (("float32", 4), ("bfloat16", 2)):
        per_relation = mask_params * (4 + 2 * moment_bytes)
        fits = [max(0, int((0.75 * m * 1e9 - frozen - transients) // per_relation))
                for m in memories_gib]
        print(f"{moments:>9} {per_relation / 1e9:>12.2f} GB {relations * per_relation / 1e9:>9.1f}"
              " GB  " + "  ".join(f"{min(f, relations):>{len(f'{m:g} GB: relations at once')}}"
                                   + ("" if f < relations else "")
                                   for f, m in zip(fits, memories_gib, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--relation-chunk", type=int, default=0,
                        help="vmap this many relations at a time (0 = all)")
    donation = parser.add_mutually_exclusive_group()
    donation.add_argument("--donate", dest="donate", action="store_true", default=None,
                          help="new state reuses the old state's buffers (default: on "
                          "accelerators only, as jit_train_step does)")
    donation.add_argument("--no-donate", dest="donate", action="store_false")
    parser.add_argument("--model-config", default=None,
                        help="instead: any family's config.json (e.g. bench/model_configs/"
                        "gpt2.json): its training state and what fits --devices")
    parser.add_argument("--layers", type=int, nargs=2, metavar=("FIRST", "LAST"))
    parser.add_argument("--matrices", nargs="+", default=None)
    parser.add_argument("--devices", type=float, nargs="+", default=[16, 24, 80])
    parser.add_argument("--fits", type=float, nargs="+", metavar="GIB",
                        help="instead: for accelerators of these memories (e.g. 16 40 80), the "
                        "chunk train.py picks and the plan of the step with it, for float32 "
                        "and bfloat16 moments")
    args = parser.parse_args()
    if args.model_config:
        state_table(args.model_config, *args.layers, args.matrices, args.relations, args.batch,
                    args.length, args.dtype, args.devices)
        return
    size = SIZES[args.size]
    if args.fits:
        fits_table(size, args.relations, args.batch, args.length, args.dtype, args.mode,
                   args.fits)
        return
    result = plan(size, args.relations, args.batch, args.length, args.dtype, args.mode,
                  args.relation_chunk or None, args.donate, moment_dtype=args.moment_dtype)
    print(f"memory plan of one training step: size={args.size}, R={args.relations}, "
          f"B={args.batch}, L={args.length}, masked layers {list(size['layers'])}, {args.dtype}"
          + (f", relation_chunk={args.relation_chunk}" if args.relation_chunk else "")
          + f"; XLA {result['backend']} compiler")
    rows = [
        (f"training state (mask logits + Adam moments in {args.moment_dtype})",
         result["state"]),
        ("frozen params (the step reads only the masked layers' and the head's)",
         result["frozen_params"]),
        ("step arguments (state, frozen params, batch)", result["arguments"]),
        ("step outputs (new state, metrics)", result["outputs"]),
        ("outputs written into donated argument buffers", result["reused"]),
        ("temporaries (activations, gradients, masked weights)", result["temporaries"]),
        ("peak = arguments + outputs - reused + temporaries", result["peak"]),
    ]
    unit, scale = ("GiB", GIB) if result["peak"] >= GIB else ("MiB", 2**20)
    for name, value in rows:
        print(f"{value / scale:10.2f} {unit}  {name}")


if __name__ == "__main__":
    main()
