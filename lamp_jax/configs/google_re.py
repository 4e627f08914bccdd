"""LAMP on LAMA Google-RE (place of birth, date of birth, place of death) with bert-base-cased.

    python train.py --config=configs/google_re.py --workdir=runs/google_re

LAMA's templates from its scripts/run_experiments.py ("[X] was born in [Y] .", "[X] (born
[Y]).", "[X] died in [Y] ."), one prompt per fact; facts whose raters said "no" more often than
"yes" are skipped and counted, as LAMA skips them. ``--config.data.prompts=evidences`` takes
LAMA's masked Wikipedia snippets instead; those longer than ``config.data.max_length`` tokens
are skipped and counted, so raise it for them. The rest is configs/trex.py's recipe.
"""

from lamp_jax.configs import trex


def get_config():
    c = trex.get_config()
    c.data.lama_set = "google_re"
    return c
