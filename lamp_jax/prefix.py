"""The frozen prefix: hidden states below the lowest pruned layer, computed once per prompt.

Why: LAMP masks only layers lb..lt. Everything below lb is frozen and unmasked, so its output for
a prompt is the same at every training step, for every relation's subnetwork and for the full
model. The reference recomputes it for every step, every subnetwork and every evaluation; we
compute it once per prompt (:func:`prefix_hidden_states`), let the batcher hand the rows out
with each batch (``RelationBatcher(row_features=...)``), and start the forward pass at lb
(``mlm_forward(hidden=..., start_layer=lb)``). With bert-base and lb = 6 that removes a quarter
of the work of a training step and half of every evaluation forward.

The cost is memory: ``N x L x H`` values in the compute dtype on the host (bert-base, 30k
prompts of 32 tokens: 2.9 GB in float32, half in bfloat16); ``config.cache_frozen_prefix=False``
turns it off.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from lamp_jax.hosts import put_global, to_host
from lamp_jax.models import ModelConfig, encode_prefix


def prefix_hidden_states(
    frozen_params: Any,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    model_config: ModelConfig,
    stop_layer: int,
    dtype: Any = jnp.float32,
    chunk: int | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """``[N, L, H]``: the output of layer ``stop_layer - 1`` for every row of ``input_ids``.

    Rows go through in chunks of ``chunk`` (the last one padded), the default
    :func:`default_chunk`; a set smaller than a chunk is padded too, so that the train, dev and
    test sets of a run share one compiled shape (a compile costs more than a chunk's rows).
    With ``mesh`` (``frozen_params`` replicated on it) each chunk's rows are split over all its
    devices, rounded up to a multiple of their count.
    """
    num = len(input_ids)
    if num == 0:
        raise ValueError("no prompts to encode")
    chunk = chunk or default_chunk()
    rows_sharding = None
    if mesh is not None and mesh.devices.size > 1:
        chunk = -(-chunk // mesh.devices.size) * mesh.devices.size
        rows_sharding = NamedSharding(mesh, P(mesh.axis_names))
    encode = _jitted_encoder(model_config, stop_layer, jnp.dtype(dtype))
    out = np.empty((num, input_ids.shape[1], model_config.hidden_size), dtype=jnp.dtype(dtype))
    starts = range(0, num, chunk)
    for start in tqdm(starts, desc=f"frozen layers 0..{stop_layer - 1}", unit="chunk",
                      disable=not progress or len(starts) < 2):
        ids, mask = input_ids[start:start + chunk], attention_mask[start:start + chunk]
        rows = len(ids)
        if rows < chunk:  # pad with copies of the first row: real tokens, no all-padding rows
            ids = np.concatenate([ids, np.repeat(ids[:1], chunk - rows, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], chunk - rows, 0)])
        if rows_sharding is not None:
            ids, mask = (put_global(x, rows_sharding) for x in (ids, mask))
        out[start:start + rows] = to_host(encode(frozen_params, ids, mask))[:rows]
    return out


def batch_prefix_hidden_states(
    frozen_params: Any,
    batch: dict[str, np.ndarray],
    *,
    model_config: ModelConfig,
    stop_layer: int,
    dtype: Any = jnp.float32,
    chunk: int | None = None,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """:func:`prefix_hidden_states` of a relation-stacked ``[R, B, L]`` batch -> ``[R, B, L, H]``
    (the batch's ``hidden`` entry)."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    hidden = prefix_hidden_states(frozen_params, ids.reshape(-1, ids.shape[-1]),
                                  attention.reshape(-1, ids.shape[-1]), model_config=model_config,
                                  stop_layer=stop_layer, dtype=dtype, chunk=chunk, mesh=mesh)
    return hidden.reshape(*ids.shape, -1)


def default_chunk() -> int:
    """Prompts per call of the prefix encoder: 128 on a CPU, 1024 on an accelerator.

    Why small on a CPU: per-prompt cost grows with the chunk once the activations leave the
    caches (small config, 2-core CPU: 115 us per prompt at 128, 170 at 256, 284 at 2048).
    """
    return 128 if jax.default_backend() == "cpu" else 1024


@functools.lru_cache(maxsize=16)
def _jitted_encoder(model_config: ModelConfig, stop_layer: int, dtype: Any):
    # One executable per (model, layer, dtype), however often a run encodes its splits.
    return jax.jit(functools.partial(encode_prefix, config=model_config, stop_layer=stop_layer,
                           dtype=dtype))


def lowest_masked_layer(mask_logits: Any) -> int:
    """The smallest ``i`` of the ``layer_<i>`` keys of a mask-logit tree."""
    return min(int(key.removeprefix("layer_")) for key in mask_logits)


def check_start_layer(mask_logits: Any, start_layer: int) -> None:
    """A mask below ``start_layer`` would be silently ignored by a forward that starts there."""
    if start_layer and lowest_masked_layer(mask_logits) < start_layer:
        raise ValueError(
            f"the batch's frozen prefix ends at layer {start_layer - 1}, but layer "
            f"{lowest_masked_layer(mask_logits)} is masked: start_layer must be <= the lowest "
            "masked layer"
        )
