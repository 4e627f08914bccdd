"""LAMP on LAMA ConceptNet with roberta-base (objects are matched as space-prefixed tokens)."""

from lamp_jax.configs import bert_base_conceptnet


def get_config():
    c = bert_base_conceptnet.get_config()
    c.model = "roberta-base"
    return c
