"""The model families lamp-jax runs, behind one interface.

Everything outside ``lamp_jax/models`` imports models from here, never from a family's module:

    from lamp_jax.models import load_mlm, mlm_forward
    mlm = load_mlm("bert-base-uncased")            # hub id or local directory
    logits = mlm_forward(mlm.params, ids, attention_mask, config=mlm.config)["logits"]

``mlm_forward``, ``encode_prefix``, ``init_params`` and ``init_like_transformers`` run the
family of the config they are given (``registry.py``); each family is a folder (``bert/``,
``modernbert/``, ``gpt2/``, ``llama/``) with its ``modeling.py``, checkpoint ``params.py`` and
``initialization.py``, built on ``layers.py``; ``checkpoint_io.py`` reads and writes every
family's Hugging Face checkpoints. ``FAMILIES[name].causal`` tells the causal LMs (GPT-2, the
Llama architecture) from the masked ones; ``load_mlm`` and ``save_mlm`` serve both.
"""

from lamp_jax.models.bert.modeling import BertConfig
from lamp_jax.models.checkpoint_io import LoadedMLM, load_mlm, save_mlm
from lamp_jax.models.gpt2.modeling import GPT2Config
from lamp_jax.models.llama.modeling import LlamaConfig
from lamp_jax.models.modernbert.modeling import ModernBertConfig
from lamp_jax.models.registry import (
    FAMILIES,
    encode_prefix,
    family_of,
    init_like_transformers,
    init_params,
    matrix_paths,
    mlm_forward,
)

ModelConfig = BertConfig  # the BERT family's config under the name most callers use

__all__ = ["FAMILIES", "BertConfig", "GPT2Config", "LlamaConfig", "LoadedMLM", "ModelConfig",
           "ModernBertConfig", "encode_prefix", "family_of", "init_like_transformers",
           "init_params", "load_mlm", "matrix_paths", "mlm_forward", "save_mlm"]
