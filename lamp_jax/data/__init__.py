"""Data pipeline: LAMA facts -> tokenised fixed-shape arrays -> relation-stacked batches.

LAMA's sets, ConceptNet, T-REx and Google-RE, are read by one function, :func:`read_lama_set`
(``lama_sets``), and downloaded by one, :func:`fetch_lama` (``lama_archive``); ``lama`` holds
the records and line reading they share.

``tfds_lama`` is not imported here because importing tensorflow_datasets costs time that most
callers (tests, the embedded toy world) do not need; import it explicitly.
"""

from lamp_jax.data.batching import RelationBatcher
from lamp_jax.data.encode import EncodedPrompts, EncodeReport, encode_facts
from lamp_jax.data.lama import LAMA_CONCEPTNET_RELATIONS, Fact, ReadReport
from lamp_jax.data.lama_archive import fetch_lama
from lamp_jax.data.lama_sets import (
    LAMA_SETS,
    PROMPTS,
    LamaData,
    labels_entry,
    read_for_config,
    read_lama_set,
    relation_display,
)
from lamp_jax.data.splits import (
    HELD_OUT_PROTOCOLS,
    held_out_split,
    reference_protocol_split,
    split_by_fact,
    split_fact_ids,
    split_facts,
)
from lamp_jax.data.triples import (
    CKBC_TO_LAMA,
    TEMPLATES,
    Triple,
    read_ckbc,
    triples_to_facts,
)

__all__ = [
    "CKBC_TO_LAMA",
    "HELD_OUT_PROTOCOLS",
    "LAMA_CONCEPTNET_RELATIONS",
    "LAMA_SETS",
    "PROMPTS",
    "TEMPLATES",
    "EncodeReport",
    "EncodedPrompts",
    "Fact",
    "LamaData",
    "ReadReport",
    "RelationBatcher",
    "Triple",
    "encode_facts",
    "fetch_lama",
    "held_out_split",
    "labels_entry",
    "read_ckbc",
    "read_for_config",
    "read_lama_set",
    "reference_protocol_split",
    "relation_display",
    "split_by_fact",
    "split_fact_ids",
    "split_facts",
    "triples_to_facts",
]
