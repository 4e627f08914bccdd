"""A causal LM's training step against a masked LM's of the same size, side by side.

    python -m bench.causal_vs_masked [--relations 8 --batch 16 --length 16 --repeats 20]

Two random models of one shape (hidden 128, 4 layers, 4 heads, FFN 512, vocabulary 1000; masks
on layers 2 and 3, the same weights: BERT's query, key, value, attention output, FFN in and out,
GPT-2's fused c_attn, c_proj, c_fc and mlp c_proj), the same relations, prompts and length,
each in the form train.py gives it: the masked LM one object token at its [MASK]
(``data.answers="single_token"``), the causal LM up to ``--answer-tokens`` answer tokens after
the prefix (``data.answers="any_length"``, the only reading a causal LM has). Prints each
step's median time and the ratio, measured in this process, alternating sides.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import machine, median_time


def steps(relations: int, batch: int, length: int, answer_tokens: int):
    """``{"masked": (step, state, params, batch, lr), "causal": ...}``, jitted and ready."""
    import jax
    import jax.numpy as jnp

    from lamp_jax.masks import MaskInit, MaskMode, MaskSpec, init_mask_logits
    from lamp_jax.models import ModelConfig, init_params
    from lamp_jax.models.gpt2.modeling import GPT2Config
    from lamp_jax.optim import OptimConfig, make_optimizer
    from lamp_jax.step import LossConfig, init_train_state, jit_train_step

    rng = np.random.default_rng(0)
    vocab = 1000
    configs = {"masked": ModelConfig(vocab_size=vocab, hidden_size=128, num_layers=4,
                                     num_heads=4, intermediate_size=512,
                                     max_position_embeddings=64),
               "causal": GPT2Config(vocab_size=vocab, hidden_size=128, num_layers=4,
                                    num_heads=4, intermediate_size=512,
                                    max_position_embeddings=64)}
    ids = rng.integers(5, vocab, (relations, batch, length)).astype(np.int32)
    common = {"input_ids": ids, "attention_mask": np.ones_like(ids),
              "weight": np.ones((relations, batch), np.float32)}
    answers = rng.integers(5, vocab, (relations, batch, answer_tokens)).astype(np.int32)
    batches = {
        "masked": dict(common, mask_pos=np.full((relations, batch), length // 2, np.int32),
                       obj_id=answers[..., 0]),
        "causal": dict(common, obj_id=answers, obj_mask=np.ones(answers.shape, np.float32),
                       mask_pos=np.broadcast_to(length - answer_tokens - 1 + np.arange(
                           answer_tokens, dtype=np.int32), answers.shape).copy()),
    }
    optim = OptimConfig(learning_rate=0.1)
    out = {}
    for name, config in configs.items():
        params = init_params(config, jax.random.key(1))
        spec = MaskSpec.create(config, first_layer=2)
        logits = init_mask_logits(spec, params, relations, MaskInit("normal", 1.0, 1.0),
                                  MaskMode(), jax.random.key(2))
        state = init_train_state(logits, make_optimizer(optim), 100, jax.random.key(3))
        step = jit_train_step(model_config=config, loss_config=LossConfig(MaskMode()),
                              optim_config=optim)
        masks = sum(int(np.prod(g.shape[1:])) for g in jax.tree.leaves(logits))
        out[name] = (step, state, params, {k: jnp.asarray(v) for k, v in batches[name].items()},
                     jnp.float32(optim.learning_rate), masks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import jax

    built = steps(args.relations, args.batch, args.length, args.answer_tokens)
    states = {name: b[1] for name, b in built.items()}

    def one(name):
        step, _, params, batch, lr, _ = built[name]
        states[name], _ = step(states[name], params, batch, lr)
        jax.block_until_ready(states[name].mask_logits)

    for name in built:  # compile, then first-touch
        for _ in range(3):
            one(name)
    times = {name: [] for name in built}
    for _ in range(args.rounds):
        for name in built:
            times[name].append(median_time(lambda name=name: one(name), args.repeats))
    masked, causal = (float(np.median(times[k])) for k in ("masked", "causal"))
    print(f"{machine()}; R={args.relations}, B={args.batch}, L={args.length}, "
          f"{built['masked'][5] / 1e6:.2f} M mask weights per relation on both sides")
    print(f"masked LM (one object token at [MASK]): {masked * 1e3:.1f} ms per step")
    print(f"causal LM (up to {args.answer_tokens} answer tokens after the prefix): "
          f"{causal * 1e3:.1f} ms per step: {causal / masked:.2f}x the masked step")


if __name__ == "__main__":
    main()
