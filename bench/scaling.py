"""How our step's cost grows with the number of relations and of pruned layers.

    python -m bench.scaling            # small widths, 2-core CPU, ~2 minutes

Prints step time and time per relation-example; near-constant time per relation-example means
cost grows linearly with the work and there is no per-relation overhead beyond it.
"""

from __future__ import annotations

import argparse
import time

import jax

from bench.common import median_time, random_batch
from lamp_jax.masks import MATRICES, MaskInit, MaskMode, MaskSpec, init_mask_logits
from lamp_jax.models.bert import ModelConfig, init_params
from lamp_jax.training import (
    LossConfig,
    OptimConfig,
    init_train_state,
    jit_train_step,
    make_optimizer,
)


def step_time(config: ModelConfig, layers: tuple[int, ...], relations: int, batch: int,
              length: int, repeats: int) -> tuple[float, float]:
    params = init_params(config, jax.random.key(0))
    mode = MaskMode("deterministic")
    logits = init_mask_logits(MaskSpec(layers, tuple(MATRICES)), params, relations,
                              MaskInit("normal", value=1.0), mode, jax.random.key(1))
    optim = OptimConfig()
    state = init_train_state(logits, make_optimizer(optim), 10_000, jax.random.key(2))
    step = jit_train_step(model_config=config, loss_config=LossConfig(mode), optim_config=optim)
    data = jax.device_put(random_batch(relations, batch, length, config.vocab_size))
    start = time.perf_counter()
    state, _ = step(state, params, data)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start

    def one():
        nonlocal state
        state, _ = step(state, params, data)
        jax.block_until_ready(state.mask_logits)

    return median_time(one, repeats), compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = (args.batch, args.length, args.repeats)

    small = ModelConfig(vocab_size=1000, hidden_size=128, num_layers=4, num_heads=4,
                        intermediate_size=512, max_position_embeddings=64)
    print(f"step time vs relations (hidden 128, 4 layers, masks on layers 2..3, "
          f"B={args.batch}, L={args.length})")
    print(f"{'relations':>10}{'step ms':>10}{'us / rel-example':>18}{'compile s':>11}")
    for relations in (1, 4, 16, 64):
        seconds, compile_s = step_time(small, (2, 3), relations, *shape)
        print(f"{relations:>10}{1e3 * seconds:>10.1f}"
              f"{1e6 * seconds / (relations * args.batch):>18.1f}{compile_s:>11.1f}")

    deep = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=12, num_heads=2,
                       intermediate_size=256, max_position_embeddings=64)
    print(f"\nstep time vs pruned layers (hidden 64, 12 layers, top layers pruned, 4 relations, "
          f"B={args.batch}, L={args.length})")
    print(f"{'layers':>10}{'step ms':>10}{'compile s':>11}")
    for count in (1, 6, 12):
        seconds, compile_s = step_time(deep, tuple(range(12 - count, 12)), 4, *shape)
        print(f"{count:>10}{1e3 * seconds:>10.1f}{compile_s:>11.1f}")


if __name__ == "__main__":
    main()
