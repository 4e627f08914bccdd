"""What a family's ``params.py`` says about its Hugging Face checkpoints, and the path convention.

A family's key table is a list of rows ``(our path, Hugging Face key, layout)``: ``our path``
is a parameter's ``/``-joined path in our params pytree (``layer_3/ffn_in/kernel``), the key is
the tensor's name in transformers' ``*ForMaskedLM`` state dict, and the layout says how the
tensor is stored (:data:`LINEAR`: PyTorch keeps linear weights ``[out, in]``, Flax ``[in, out]``;
:data:`COPY`: as is). A family's ``key_table(config)`` gives a :class:`KeyTable`: those rows for
one concrete config plus what converting needs besides them. ``lamp_jax.models.checkpoint_io``
reads and writes checkpoints through it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

LINEAR, COPY = "linear", "copy"

Row = tuple[str, str, str]  # (our path, Hugging Face key, LINEAR or COPY)


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """How one model config's params map to a Hugging Face MLM state dict."""

    rows: tuple[Row, ...]  # one per parameter of ours
    shapes: Mapping[str, tuple[int, ...]]  # our shape of each row's parameter
    prefix: str  # the encoder's prefix in the state dict (``bert``, ``model``)
    decoder_weight: str  # the vocabulary projection: tied to the word embeddings unless untied
    # The vocabulary projection's own bias. transformers ties it to the head bias, but with
    # untied embeddings (v5) only this one is used by the forward, so it wins when present.
    decoder_bias: str | None
    ignorable: tuple[str, ...] = ()  # regexes of tensors we knowingly do not use
    # (regex, replacement) applied to every checkpoint key before lookup (old spellings).
    renames: tuple[tuple[str, str], ...] = ()

    @property
    def head_bias(self) -> str:
        """The key of our ``mlm_head/bias``."""
        return next(theirs for ours, theirs, _ in self.rows if ours == "mlm_head/bias")

    @property
    def head_prefixes(self) -> frozenset[str]:
        """First components of the keys outside the encoder (the head's)."""
        outside = [theirs for _, theirs, _ in self.rows if not theirs.startswith(self.prefix + ".")]
        return frozenset(key.split(".")[0] for key in [*outside, self.decoder_weight])


def layer_rows(encoder_rows: Iterable[Row], head_rows: Iterable[Row], prefix: str,
               num_layers: int, tie_word_embeddings: bool, decoder_weight: str,
               decoder_path: str = "mlm_head/decoder/kernel") -> list[Row]:
    """A family's table written once per layer (``{i}`` in both names) made concrete: the
    encoder rows for every layer under ``prefix``, then the head's, then the untied decoder's
    kernel (our ``decoder_path``, a linear layer's weight) when there is one."""
    rows = [(ours.format(i=i), f"{prefix}.{theirs.format(i=i)}", kind)
            for ours, theirs, kind in encoder_rows
            for i in (range(num_layers) if "{i}" in ours else [None])]
    rows += list(head_rows)
    if not tie_word_embeddings:
        rows.append((decoder_path, decoder_weight, LINEAR))
    return rows


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (the path convention of key tables and masks)."""
    flat = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_params`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


@functools.lru_cache(maxsize=8)
def traced_param_shapes(init_params: Callable[[Any, jax.Array], Any], config: Any
                        ) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every parameter ``init_params(config, rng)`` makes (traced with
    ``jax.eval_shape``: no weights are allocated)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {path: tuple(leaf.shape) for path, leaf in flatten_params(abstract).items()}
