"""LAMP on LAMA ConceptNet with distilbert-base-uncased (6 layers: masks on layers 3..5)."""

from lamp_jax.configs import bert_base_conceptnet


def get_config():
    c = bert_base_conceptnet.get_config()
    c.model = "distilbert-base-uncased"
    c.mask.first_layer, c.mask.last_layer = 3, 5
    return c
