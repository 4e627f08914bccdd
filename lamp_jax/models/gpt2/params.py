"""GPT-2 checkpoints (``GPT2LMHeadModel``): which transformers tensor each of our params is.

Rows are ``(our path, Hugging Face key, layout)`` with ``{i}`` the layer index and the
decoder's keys written without their ``transformer.`` prefix (``lamp_jax.models.checkpoint_keys``).
GPT-2's ``Conv1D`` weights are stored ``[in, out]``, as our kernels: they are copied (:data:`COPY`),
not transposed; only an untied ``lm_head`` is a PyTorch ``nn.Linear`` (:data:`LINEAR`). The hub's
checkpoints (``gpt2``, ``distilgpt2``) are a bare ``GPT2Model`` (no ``transformer.`` prefix, no
head) and carry each layer's causal-mask buffer ``attn.bias`` (and ``attn.masked_bias``), which
transformers no longer uses either.
"""

from __future__ import annotations

from lamp_jax.models.checkpoint_keys import COPY, KeyTable, Row, layer_rows, traced_param_shapes
from lamp_jax.models.gpt2.modeling import GPT2Config, init_params

PREFIX = "transformer"
LM_HEAD = "lm_head.weight"

_DECODER_TABLE: tuple[Row, ...] = (
    ("embeddings/wte/embedding", "wte.weight", COPY),
    ("embeddings/wpe/embedding", "wpe.weight", COPY),
    ("layer_{i}/attn_norm/scale", "h.{i}.ln_1.weight", COPY),
    ("layer_{i}/attn_norm/bias", "h.{i}.ln_1.bias", COPY),
    ("layer_{i}/attention/qkv/kernel", "h.{i}.attn.c_attn.weight", COPY),
    ("layer_{i}/attention/qkv/bias", "h.{i}.attn.c_attn.bias", COPY),
    ("layer_{i}/attention/output/kernel", "h.{i}.attn.c_proj.weight", COPY),
    ("layer_{i}/attention/output/bias", "h.{i}.attn.c_proj.bias", COPY),
    ("layer_{i}/mlp_norm/scale", "h.{i}.ln_2.weight", COPY),
    ("layer_{i}/mlp_norm/bias", "h.{i}.ln_2.bias", COPY),
    ("layer_{i}/ffn_in/kernel", "h.{i}.mlp.c_fc.weight", COPY),
    ("layer_{i}/ffn_in/bias", "h.{i}.mlp.c_fc.bias", COPY),
    ("layer_{i}/ffn_out/kernel", "h.{i}.mlp.c_proj.weight", COPY),
    ("layer_{i}/ffn_out/bias", "h.{i}.mlp.c_proj.bias", COPY),
    ("final_norm/scale", "ln_f.weight", COPY),
    ("final_norm/bias", "ln_f.bias", COPY),
)

# The tokenizer class transformers' AutoTokenizer gives a checkpoint whose tokenizer_config.json
# and config.json name none (its TOKENIZER_MAPPING_NAMES).
TOKENIZER_CLASSES = {"gpt2": "GPT2Tokenizer"}


def param_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every parameter the Flax model for ``config`` has."""
    return dict(traced_param_shapes(init_params, config))


def key_table(config: GPT2Config) -> KeyTable:
    """The rows of ``config``'s model, its untied LM head included when it has one."""
    rows = layer_rows(_DECODER_TABLE, (), PREFIX, config.num_layers, config.tie_word_embeddings,
                      LM_HEAD, decoder_path="lm_head/kernel")
    return KeyTable(rows=tuple(rows), shapes=param_shapes(config), prefix=PREFIX,
                    decoder_weight=LM_HEAD, decoder_bias=None,
                    ignorable=(r".*\.attn\.(masked_)?bias$",))
