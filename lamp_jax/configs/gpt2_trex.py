"""LAMP on LAMA T-REx (41 Wikidata relations) with GPT-2: relation subnetworks of a causal LM.

Needs internet (hub weights + the LAMA zip) and, practically, a GPU/TPU:
    python train.py --config=configs/gpt2_trex.py --workdir=runs/gpt2_trex
    python train.py --config=configs/gpt2_trex.py --config.model=distilgpt2   # 6 layers: 3..5

A causal LM reads LAMA's template up to ``[Y]`` and predicts the object's tokens after it
(``data.answers = "any_length"``: GPT-2's byte-level BPE splits most objects into several
tokens); templates whose ``[Y]`` is not last are dropped and counted (``answer_not_last``,
README: Causal families). Ranking orders each relation's objects by their tokens' summed
log-probability. Masks: GPT-2's four matrices (``qkv`` = c_attn, ``attn_out`` = attention
c_proj, ``ffn_in`` = c_fc, ``ffn_out`` = mlp c_proj) of layers 6..11, the paper's upper half:
42.5 M mask weights per relation, as bert-base's. The rest is configs/trex.py's recipe, with
binary (threshold) masks selected and reported, logits starting at 1.0 and a learning rate at
which Adam's updates can move them across the threshold over 6 epochs (unmeasured on hub
weights here: train.py warns when masks cannot prune).

Memory (``lamp-jax`` README, memory table; ``python -m bench.memory_plan``): 41 relations x
42.5 M mask weights, a 20.9 GB training state with float32 Adam moments, 13.9 GB with
``--config.optim.moment_dtype=bfloat16``.
"""

from lamp_jax.configs import trex


def get_config():
    c = trex.get_config()
    c.model = "gpt2"
    c.data.answers = "any_length"
    c.data.max_answer_tokens = 5
    c.mask.first_layer, c.mask.last_layer = 6, 11
    c.mask.matrices = ("qkv", "attn_out", "ffn_in", "ffn_out")
    c.mask.eval_kind = "threshold"
    c.optim.learning_rate = 0.05
    c.optim.schedule = "linear"
    return c
