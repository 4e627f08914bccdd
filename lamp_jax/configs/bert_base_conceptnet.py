"""LAMP on LAMA ConceptNet with bert-base-uncased, as in the paper (layers 6..11, 6 epochs).

Needs internet (hub weights + the LAMA zip) and, practically, a GPU/TPU:
    python train.py --config=configs/bert_base_conceptnet.py --workdir=runs/bert_base
"""

from lamp_jax.configs import default


def get_config():
    c = default.get_config()
    c.model = "bert-base-uncased"
    c.data.source = "lama"
    c.data.max_length = 48
    c.data.fractions = (0.6, 0.2, 0.2)
    c.mask.first_layer, c.mask.last_layer = 6, 11
    c.mask.mode = "stochastic"
    c.mask.init_value = 1.0  # about 27% initial sparsity, the reference default
    c.mask.tau = 0.1
    c.optim.learning_rate = 3e-4  # the reference's settings
    c.batch_size = 32
    c.epochs = 6
    return c
