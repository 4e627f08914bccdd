"""The model families lamp-jax runs, behind one interface.

Everything outside ``lamp_jax/models`` imports models from here, never from a family's module:

    from lamp_jax.models import load_mlm, mlm_forward
    mlm = load_mlm("bert-base-uncased")            # hub id or local directory
    logits = mlm_forward(mlm.params, ids, attention_mask, config=mlm.config)["logits"]
"""

from lamp_jax.models.bert import ModelConfig, encode_prefix, init_params, mlm_forward
from lamp_jax.models.modernbert import ModernBertConfig
from lamp_jax.models.params import LoadedMLM, load_mlm, save_mlm

__all__ = ["LoadedMLM", "ModelConfig", "ModernBertConfig", "encode_prefix", "init_params",
           "load_mlm", "mlm_forward", "save_mlm"]
