"""The paper's setting end to end: train.py on bert-base x 16 relations, measured from outside.

    python -m bench.scale_run                          # bert-base, 16 relations, 2 epochs
    python -m bench.scale_run --moment-dtype bfloat16  # Adam moments stored in bfloat16
    python -m bench.scale_run --size tiny              # a 2-layer model: checks the harness

It builds what a user would bring, offline, in ``--workdir``:

* ``model/``: a randomly initialised BERT with the real bert-base-uncased configuration (the
  values of its ``config.json``), saved in the hub format (``config.json``,
  ``model.safetensors``) with a WordPiece tokenizer of the same 30522-entry layout ([PAD] 0,
  [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103; our entity words instead of English);
* ``lama.jsonl``: LAMA ConceptNet records (``sub``, ``obj``, ``pred``, ``masked_sentences``,
  ``uuid``) for the 16 relations, ``--facts`` facts each, one template sentence per fact;

then runs ``train.py --config=configs/bert_base_conceptnet.py`` on them in a child process and
samples its resident memory every 0.2 s. It prints peak RSS, wall time per phase (as the run
itself measured them: load, prefix, setup, steps, evaluation, checkpoints, report), bytes the
run wrote and what its directory holds, and writes ``scale_run.json`` and ``rss.png`` (the RSS
timeline with the phases) next to the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

# bert-base-uncased's config.json (the hub's, 2026), the architecture fields.
BERT_BASE_UNCASED = {
    "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30522,
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512,
    "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
}
# Checks the harness in seconds: same vocabulary, 2 layers (masks on layer 1).
TINY = dict(BERT_BASE_UNCASED, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128)
GIB = 2**30


def build_vocab(entities: list[str], words: list[str], size: int = 30522) -> list[str]:
    """bert-base-uncased's special-token layout, then ``words`` and ``entities``, then filler
    up to ``size`` entries."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]",
                                                              "[MASK]"]
    seen = set(vocab)
    for w in [".", ",", *words, *entities]:
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    vocab += [f"filler{i}" for i in range(size - len(vocab))]
    if len(vocab) != size:
        raise ValueError(f"{len(vocab)} vocabulary entries do not fit in {size}")
    return vocab


def write_inputs(directory: Path, hf_config: dict, facts_per_relation: int,
                 num_relations: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """The hub-format model directory and the LAMA-format jsonl (see the module doc)."""
    import jax
    from transformers import BertTokenizerFast

    from lamp_jax.data.triples import TEMPLATES, fill_template
    from lamp_jax.models import ModelConfig, init_params, save_mlm

    rng = np.random.default_rng(seed)
    relations = list(TEMPLATES)[:num_relations]
    entities = [f"entity{i}" for i in range(2 * facts_per_relation * len(relations))]
    words = sorted({w.strip(".,").lower() for t in TEMPLATES.values() for w in t.split()
                    if "{" not in w and "[" not in w})
    model_dir = directory / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "vocab.txt").write_text("\n".join(build_vocab(entities, words)) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(model_dir), do_lower_case=True)
    config = ModelConfig.from_hf_dict(hf_config)
    params = init_params(config, jax.random.key(seed))
    save_mlm(model_dir, params, config, tokenizer)
    # The hub's extra fields beside the architecture (save_mlm writes the architecture).
    written = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**hf_config, **written}, indent=2))

    records = []
    for r, relation in enumerate(relations):
        for i in range(facts_per_relation):
            subject = entities[2 * (r * facts_per_relation + i)]
            obj = entities[rng.integers(len(entities))]
            sentence = fill_template(relation, subject)
            records.append({"sub": subject, "obj": obj, "pred": relation, "obj_label": obj,
                            "masked_sentences": [sentence],
                            "uuid": f"{relation}-{i:05d}"})
    jsonl = directory / "lama.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in records))
    return model_dir, jsonl


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (train.py runs in one process)."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _written_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_train(args: list[str], log_path: Path, interval_s: float = 0.2) -> dict:
    """Runs ``train.py args`` and samples its RSS; returns the samples and what it wrote."""
    samples: list[tuple[float, int]] = []
    written: list[int] = []
    start = time.time()
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "train.py", *args], stdout=log,
                                 stderr=subprocess.STDOUT, env=dict(os.environ,
                                                                    PYTHONUNBUFFERED="1"))

        def sample():
            while child.poll() is None:
                samples.append((time.time() - start, _tree_rss(child.pid)))
                w = _written_bytes(child.pid)
                if w is not None:
                    written.append(w)
                time.sleep(interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        sampler.join()
    wall = time.time() - start
    result = {"start_unix": start, "wall_s": wall, "samples": samples,
              "written_bytes": max(written, default=None), "exit_code": code}
    log_path.with_suffix(".rss.json").write_text(json.dumps(result))
    if code != 0:
        tail = log_path.read_text()[-3000:]
        peak = max((r for _, r in samples), default=0) / GIB
        raise RuntimeError(f"train.py exited with {code} after {wall:.0f} s (peak RSS sampled "
                           f"{peak:.2f} GiB; samples in {log_path.with_suffix('.rss.json')}); "
                           f"the end of {log_path}:\n{tail}")
    return result


def directory_bytes(path: Path) -> dict[str, int]:
    """Bytes under each top-level entry of ``path``."""
    out = {}
    for entry in sorted(path.iterdir()):
        files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
        out[entry.name] = sum(f.stat().st_size for f in files)
    return out


def plot_rss(result: dict, resources: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, rss = zip(*result["samples"], strict=True)
    offset = resources["started_unix"] - result["start_unix"]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(t, np.asarray(rss) / GIB, color="black", lw=1)
    colors = {}
    for phase, lo, hi in resources["phase_timeline"]:
        color = colors.setdefault(phase, f"C{len(colors)}")
        ax.axvspan(lo + offset, hi + offset, color=color, alpha=0.25, lw=0,
                   label=phase if phase not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xlabel("seconds since train.py started")
    ax.set_ylabel("resident memory (GiB)")
    ax.legend(loc="lower right", fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("base", "tiny"), default="base")
    parser.add_argument("--facts", type=int, default=54,
                        help="facts per relation (54 = 32 train / 11 dev / 11 test: one step of "
                        "32 prompts per relation per epoch)")
    parser.add_argument("--relations", type=int, default=16, help="the first N of the 16")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--moment-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="frozen weights and compute")
    parser.add_argument("--workdir", default="/tmp/lamp_scale_run")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="more train.py config overrides (e.g. relation_chunk=2)")
    args = parser.parse_args()

    root = Path(args.workdir)
    inputs = root / f"inputs_{args.size}_{args.relations}x{args.facts}"
    t0 = time.time()
    if not (inputs / "lama.jsonl").exists():
        write_inputs(inputs, BERT_BASE_UNCASED if args.size == "base" else TINY, args.facts,
                     args.relations)
    build_s = time.time() - t0
    tag = f"{args.size}_{args.relations}_{args.moment_dtype}_{args.dtype}"
    run_dir = root / f"run_{tag}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    train_args = ["--config=configs/bert_base_conceptnet.py",
                  f"--config.model={inputs / 'model'}",
                  f"--config.data.source={inputs / 'lama.jsonl'}",
                  f"--config.epochs={args.epochs}", f"--config.optim.moment_dtype="
                  f"{args.moment_dtype}", f"--config.dtype={args.dtype}",
                  f"--workdir={run_dir}", *[f"--config.{s}" for s in args.set]]
    if args.size == "tiny":
        train_args += ["--config.mask.first_layer=1", "--config.mask.last_layer=1"]
    result = run_train(train_args, root / f"train_{tag}.log")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    resources = metrics["resources"]
    stored = directory_bytes(run_dir)
    peak_sampled = max(r for _, r in result["samples"])
    report = {"size": args.size, "relations": len(metrics["relations"]),
              "facts_per_relation": args.facts, "epochs": args.epochs,
              "moment_dtype": args.moment_dtype, "dtype": args.dtype, "steps": metrics["steps"],
              "wall_s": result["wall_s"], "inputs_built_s": build_s,
              "peak_rss_bytes": resources["peak_rss_bytes"],
              "peak_rss_sampled_bytes": peak_sampled,
              "peak_device_bytes": resources["peak_device_bytes"],
              "phase_seconds": resources["phase_seconds"],
              "written_bytes": result["written_bytes"], "run_dir_bytes": stored,
              "test_macro_P@1": metrics["test"]["pruned"]["macro_P@1"]}
    (root / f"scale_run_{tag}.json").write_text(json.dumps(report, indent=2))
    plot_rss(result, resources, root / f"rss_{tag}.png")

    from bench.common import machine

    layers = (BERT_BASE_UNCASED if args.size == "base" else TINY)["num_hidden_layers"]
    print(f"scale run: {args.size} ({layers} layers), {report['relations']} relations x "
          f"{args.facts} facts, {args.epochs} epochs ({report['steps']} steps), moments "
          f"{args.moment_dtype}, compute {args.dtype}")
    print(f"machine: {machine()}")
    print(f"peak RSS {report['peak_rss_bytes'] / GIB:.2f} GiB (sampled every 0.2 s: "
          f"{peak_sampled / GIB:.2f} GiB)"
          + (f"; peak device memory {report['peak_device_bytes'] / GIB:.2f} GiB"
             if report["peak_device_bytes"] else ""))
    print(f"wall {result['wall_s']:.1f} s; per phase: "
          + ", ".join(f"{k} {v:.1f}" for k, v in resources["phase_seconds"].items()))
    written = result["written_bytes"]
    print("bytes written by train.py: "
          + (f"{written / GIB:.2f} GiB" if written is not None else "unknown")
          + "; run directory: " + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                            for k, v in stored.items() if v > 2**20))
    print(f"test macro P@1 {report['test_macro_P@1']:.3f} (random weights: not a result); "
          f"files: {root}")


if __name__ == "__main__":
    main()
