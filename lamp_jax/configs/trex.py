"""LAMP on LAMA T-REx (41 Wikidata relations) with bert-base-cased, LAMA's model for T-REx.

Needs internet (hub weights + the LAMA zip, unzipped once into config.data.cache_dir) and,
practically, a GPU/TPU:
    python train.py --config=configs/trex.py --workdir=runs/trex
    python train.py --config=configs/trex.py --config.data.source=/path/to/LAMA/data

Prompts are LAMA's templates from relations.jsonl ("[X] was born in [Y] ."), one per fact;
``--config.data.prompts=evidences`` takes LAMA's evidence sentences instead (longer: raise
``--config.data.max_length``). Relations are named by Wikidata id, and tables and plots add
the label: "P19 (place of birth)". Everything else is configs/bert_base_conceptnet.py's
recipe (layers 6..11, stochastic masks, Adam 3e-4, batch 32, 6 epochs, 60/20/20 by fact).

Memory: 41 relations x 42.5 M mask weights hold a 20.9 GB training state with float32 Adam
moments, 13.9 GB with ``--config.optim.moment_dtype=bfloat16`` (README, Data).
"""

from lamp_jax.configs import bert_base_conceptnet


def get_config():
    c = bert_base_conceptnet.get_config()
    c.model = "bert-base-cased"
    c.data.source = "lama"
    c.data.lama_set = "trex"
    c.data.prompts = "templates"
    return c
