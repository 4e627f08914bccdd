"""LAMP on LAMA ConceptNet with answerdotai/ModernBERT-base: bert_base_conceptnet's recipe on the
upper half of ModernBERT-base's 22 layers.

Needs internet (hub weights + the LAMA zip) and, practically, a GPU/TPU:
    python train.py --config=configs/modernbert_conceptnet.py --workdir=runs/modernbert_base

Everything not set here is bert_base_conceptnet's (stochastic masks, tau 0.1, logits starting
at 1.0, Adam at a constant 3e-4, batch 32, 6 epochs, soft-mask inference, 60/20/20 held-out
facts), including its caveat: binary masks cannot cross the threshold in that many updates.
ModernBERT's tokenizer is byte-level BPE, so objects are matched as space-prefixed tokens
(``Ġword``), as for RoBERTa. Masks on layers 11..21 and all four matrices hold 55.1 M mask
weights per relation: 16 relations take 10.6 GB of state (7.1 GB with
``--config.optim.moment_dtype=bfloat16``).
"""

from lamp_jax.configs import bert_base_conceptnet


def get_config():
    c = bert_base_conceptnet.get_config()
    # The hub checkpoint (22 layers, hidden 768, GeGLU MLP of 1152, global attention every 3rd
    # layer, local windows of 128 tokens); any ModernBERT directory or id loads the same way.
    c.model = "answerdotai/ModernBERT-base"
    # The upper half of the 22 layers, as the paper's 6..11 of bert-base's 12.
    c.mask.first_layer, c.mask.last_layer = 11, 21
    # All four of ModernBERT's matrices: the fused Wqkv, the attention output Wo, the fused
    # GeGLU input Wi (input and gate halves) and the MLP output Wo (lamp_jax.masks).
    c.mask.matrices = ("qkv", "attn_out", "ffn_in", "ffn_out")
    return c
