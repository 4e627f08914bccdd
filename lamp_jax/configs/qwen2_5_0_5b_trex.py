"""LAMP on LAMA T-REx with Qwen2.5-0.5B: the Llama architecture (grouped-query attention,
SwiGLU, q/k/v biases), a 0.5B-class causal LM.

Needs internet and a GPU/TPU with room for the state (below):
    python train.py --config=configs/qwen2_5_0_5b_trex.py --workdir=runs/qwen_trex

Prompts, answers and ranking as configs/gpt2_trex.py. Masks: all seven matrices (``query``,
``key``, ``value``, ``attn_out``, ``ffn_gate``, ``ffn_in`` = up_proj, ``ffn_out`` = down_proj) of
the upper half, layers 12..23: 14.9 M mask weights per layer, 179 M per relation. Weights and
compute in bfloat16, Adam moments in bfloat16 (8 bytes per mask weight): 41 relations hold a
58.7 GB training state. By train.py's estimate (``python -m bench.memory_plan --model-config
bench/model_configs/qwen2_5_0_5b.json --layers 12 23 --relations 41 --batch 16 --dtype
bfloat16``) 37 of them fit at once in JAX's 75% of an 80 GB device, 8 in a 24 GB one, 3 in a
16 GB one: train the others in a second run (``--config.data.relations=P19,P20,...``), or give
JAX more of the card (``XLA_PYTHON_CLIENT_MEM_FRACTION``; README, memory table).
"""

from lamp_jax.configs import gpt2_trex


def get_config():
    c = gpt2_trex.get_config()
    c.model = "Qwen/Qwen2.5-0.5B"
    c.dtype = "bfloat16"
    c.optim.moment_dtype = "bfloat16"
    c.mask.first_layer, c.mask.last_layer = 12, 23
    c.mask.matrices = ("query", "key", "value", "attn_out", "ffn_gate", "ffn_in", "ffn_out")
    c.batch_size = 16
    return c
