"""The embedded default model: a tiny BERT pretrained by our code on the toy world.

    python -m lamp_jax.embedded                 # regenerate lamp_jax/assets/embedded_mlm
    python -m lamp_jax.embedded --out DIR       # or write it elsewhere

The result is an ordinary Hugging Face-format directory (config.json, model.safetensors,
tokenizer files) that ``load_mlm`` reads like any hub model, plus ``lama_probe.jsonl``, the
world's probes in the LAMA format. See ``lamp_jax.world`` for why the world looks as it does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lamp_jax import world
from lamp_jax.models import ModelConfig, init_params, mlm_forward, save_mlm

EMBEDDED_ASSET_DIR = Path(__file__).parent / "assets" / "embedded_mlm"
CACHE_DIR = Path("~/.cache/lamp_jax/embedded_mlm").expanduser()
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_LENGTH = 16
_FILES = ("config.json", "model.safetensors", "vocab.txt", "lama_probe.jsonl")


def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=128, num_layers=4, num_heads=4,
                       intermediate_size=512, max_position_embeddings=32)


def build_tokenizer(directory: Path):
    """A word-level uncased BERT tokenizer over the world's vocabulary, saved in ``directory``."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *world.vocabulary()]) + "\n")
    return BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)


def _encode_corpus(tokenizer, corpus: list[tuple[str, str]]) -> tuple[np.ndarray, ...]:
    enc = tokenizer([s for s, _ in corpus], padding="max_length", max_length=MAX_LENGTH,
                    truncation=True, return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    targets = np.asarray(tokenizer.convert_tokens_to_ids([t for _, t in corpus]))
    return ids, enc["attention_mask"].astype(np.int32), ids == targets[:, None]


def pretrain_embedded_mlm(
    out_dir: str | Path,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    learning_rate: float = 1e-3,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Pretrains the tiny MLM on the world's corpus and saves it (with the probes) to ``out_dir``.

    Masking: 15% of tokens at random as in BERT, plus the sentence's fact object (or distractor)
    with probability 0.7, which is what makes 1000 steps (about a minute on 2 CPU cores) enough.
    Deterministic for a seed on a given platform. Returns losses and timings.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    facts = world.make_facts(seed)
    ids, attention, is_target = _encode_corpus(tokenizer, world.pretraining_corpus(facts, seed))
    config = tiny_config(len(tokenizer))
    params = init_params(config, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 5, steps)
    tx = optax.adamw(schedule, weight_decay=0.01)
    opt_state = tx.init(params)
    special = np.asarray(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))

    def loss_fn(p, inputs, attn, labels, weight):
        logits = mlm_forward(p, inputs, attn, config=config)["logits"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(ce * weight) / jnp.maximum(weight.sum(), 1.0)

    @jax.jit
    def step(p, o, inputs, attn, labels, weight):
        loss, grads = jax.value_and_grad(loss_fn)(p, inputs, attn, labels, weight)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    rng = np.random.default_rng(seed)
    losses, start = [], time.perf_counter()
    for _ in tqdm(range(steps), desc="pretraining the embedded MLM", disable=not show_progress):
        rows = rng.integers(0, len(ids), batch_size)
        labels, attn = ids[rows], attention[rows]
        chosen = (attn == 1) & ~np.isin(labels, special) & (rng.random(labels.shape) < 0.15)
        chosen |= is_target[rows] & (rng.random((batch_size, 1)) < 0.7)
        inputs = np.where(chosen, tokenizer.mask_token_id, labels)
        params, opt_state, loss = step(params, opt_state, inputs, attn, labels,
                                       chosen.astype(np.float32))
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    save_mlm(out_dir, params, config, tokenizer)
    with open(out_dir / "lama_probe.jsonl", "w") as f:
        for record in world.probe_records(facts):
            f.write(json.dumps(record) + "\n")
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-50:])),
            "seconds": seconds, "steps": steps}


def _complete(directory: Path) -> bool:
    return all((directory / name).exists() for name in _FILES)


def ensure_embedded_model(cache_dir: str | Path | None = None) -> Path:
    """The shipped model directory, or (if the package was installed without it) one pretrained
    once into ``cache_dir`` (default ``~/.cache/lamp_jax/embedded_mlm``)."""
    if _complete(EMBEDDED_ASSET_DIR):
        return EMBEDDED_ASSET_DIR
    target = Path(cache_dir).expanduser() if cache_dir else CACHE_DIR
    if not _complete(target):
        print(f"the embedded model is not shipped with this install; pretraining it into {target}")
        pretrain_embedded_mlm(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="(Re)build the embedded toy-world MLM.")
    parser.add_argument("--out", default=str(EMBEDDED_ASSET_DIR))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stats = pretrain_embedded_mlm(args.out, steps=args.steps, seed=args.seed)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
