"""A 0.5B-class causal LM through train.py on this machine: Qwen2.5-0.5B's architecture
(``bench/model_configs/qwen2_5_0_5b.json``) with random weights drawn as transformers draws them,
saved in the hub format with a byte-level tokenizer for LAMA's T-REx fixture, trained with
``configs/qwen2_5_0_5b_trex.py`` in a child process whose peak resident memory is read by
``/usr/bin/time -v``.

    python -m bench.causal_scale_run --workdir /tmp/qwen_scale [--relations 5] [--epochs 1]

Prints the run's peak RSS, its phases and the training state it held.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(workdir: Path) -> tuple[Path, Path]:
    """The model directory and the LAMA data folder."""
    import jax
    import numpy as np

    from lamp_jax.data.lama_sets import read_lama_set
    from lamp_jax.models import init_like_transformers, save_mlm
    from lamp_jax.models.registry import config_from_hf_dict
    from tests.test_lama_sets import write_lama_data
    from tests.tokenizer_fixtures import make_causal_tokenizer, words_of

    data = workdir / "data"
    if not data.exists():
        write_lama_data(data)
    model = workdir / "model"
    if not (model / "config.json").exists():
        facts = read_lama_set(data, "trex").facts
        words = words_of([s for f in facts for s in f.sentences] + [f.obj for f in facts])
        tokenizer = make_causal_tokenizer(model, words, bos="<|begin_of_text|>")
        hf = json.loads((ROOT / "bench/model_configs/qwen2_5_0_5b.json").read_text())
        config = config_from_hf_dict(dict(hf, bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id))
        params = init_like_transformers(config, jax.random.key(0))
        params = jax.tree.map(lambda x: np.asarray(x, dtype=jax.numpy.bfloat16), params)
        save_mlm(model, params, config, tokenizer)
    return model, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, data = build(args.workdir)
    command = ["/usr/bin/time", "-v", sys.executable, "train.py",
               "--config=configs/qwen2_5_0_5b_trex.py", f"--config.model={model}",
               f"--config.data.source={data}", f"--workdir={args.workdir / 'run'}",
               f"--config.epochs={args.epochs}", "--config.batch_size=4",
               "--config.plots=False", "--config.specialization=False",
               "--config.controls.random_draws=1"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode:
        sys.exit(text[-4000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1])
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", text)[1]
    state = re.search(r"training state ([\d.]+ GiB)[^\n]*", text)[0]
    phases = re.search(r"wall seconds per phase: [^\n]*", text)[0]
    print(f"peak RSS {peak_kb / 2**20:.2f} GiB, wall {wall}; {state}\n{phases}")


if __name__ == "__main__":
    main()
