"""A relation's subnetwork exported as a Hugging Face checkpoint gives, in transformers'
PyTorch ``pipeline("fill-mask")``, the same top-5 tokens and probabilities as ``run.predict``."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from lamp_jax import load_run
from lamp_jax.configs import default
from lamp_jax.data import read_lama_set
from lamp_jax.loop import train_and_evaluate
from lamp_jax.models import ModelConfig, init_params, save_mlm
from tests.needs import require

FIXTURE = Path(__file__).parent / "fixtures" / "lama_conceptnet_sample.jsonl"
QUIET = {"log": lambda *args, **kwargs: None}
pytestmark = pytest.mark.slow
require("torch")  # transformers' pipeline runs the exported checkpoint with PyTorch


def _pipeline_top5(directory: Path, prompt: str):
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(directory), device="cpu", top_k=5)
    return [(row["token"], row["score"]) for row in fill(prompt)]


def assert_export_matches_predict(run, relation: str, prompt: str, directory: Path,
                                  kind: str = "threshold") -> float:
    """Exports, runs transformers on it, compares; returns the largest probability gap."""
    run.export_subnetwork(relation, directory, kind=kind)
    ours = run.predict(prompt, relation=relation, k=5, kind=kind)
    tokenizer = run.mlm.tokenizer
    theirs = _pipeline_top5(directory, prompt.replace("[MASK]", tokenizer.mask_token))
    assert [tokenizer.convert_tokens_to_ids(t) for t, _ in ours] == [t for t, _ in theirs]
    gap = float(np.max(np.abs(np.array([p for _, p in ours]) - [p for _, p in theirs])))
    assert gap < 1e-5, (relation, ours, theirs)
    info = json.loads((directory / "lamp_jax_subnetwork.json").read_text())
    assert info["relation"] == relation and info["kind"] == kind
    return gap


@pytest.fixture(scope="module")
def embedded_run(embedded_run_dir):
    return load_run(embedded_run_dir)  # the session's embedded run (tests/conftest.py)


def test_every_relation_of_the_embedded_run_exports_to_transformers(embedded_run, tmp_path):
    run = embedded_run
    assert run.sparsity()["total"].min() > 0, "the masks must prune something"
    facts = read_lama_set(_embedded_probe_file()).facts
    gaps, changed = [], 0
    for relation in run.relations:
        prompt = next(f.sentences[0] for f in facts if f.relation == relation)
        gaps.append(assert_export_matches_predict(run, relation, prompt, tmp_path / relation))
        tokens = [[t for t, _ in run.predict(prompt, relation=r)] for r in (relation, None)]
        changed += tokens[0] != tokens[1]
    # predict(..., relation=...) really uses the relation's mask: most top-5 token lists
    # differ from the full model's (and the export matched them, so the export carries the
    # mask too). Probabilities alone would differ under any mask.
    assert changed >= len(run.relations) // 2, changed
    print(f"largest probability difference over {len(gaps)} relations: {max(gaps):.2e}")


def test_soft_masks_export_too(embedded_run, tmp_path):
    prompt = "the boat is a kind of [MASK] ."
    assert_export_matches_predict(embedded_run, "IsA", prompt, tmp_path / "soft",
                                  kind="expectation")


def _embedded_probe_file() -> Path:
    from lamp_jax.embedded import ensure_embedded_model

    return ensure_embedded_model() / "lama_probe.jsonl"


WORDPIECE_PIECES = ("##s", "##ing", "##ed", "##er", "##ly", "##able", "##e", "##a", "##o")


def make_wordpiece_bert(directory: Path) -> Path:
    """A random-init hub-format BERT whose tokenizer is real WordPiece: whole words for most of
    the fixture's words, ``##`` continuation pieces for the rest (``knives`` -> ``kn ##ive
    ##s``-style splits), lower-casing, [UNK] for anything else."""
    from transformers import BertTokenizerFast

    facts = read_lama_set(FIXTURE).facts
    words = sorted({w.lower() for f in facts for s in (*f.sentences, f.obj)
                    for w in s.replace("[MASK]", " ").replace(".", " ").split()})
    whole = [w for i, w in enumerate(words) if i % 3 or len(w) < 5]  # a third are split
    stems = sorted({w[:-1] for w in words if w not in whole} | {w[:-2] for w in words
                                                                  if w not in whole})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *whole, *stems,
             *WORDPIECE_PIECES, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    vocab = list(dict.fromkeys(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)
    split = [w for w in words if len(tokenizer.tokenize(w)) > 1]
    assert split and any(t.startswith("##") for t in tokenizer.tokenize(split[0]))
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    return save_mlm(directory, init_params(config, jax.random.key(3)), config, tokenizer)


def test_a_hub_format_bert_with_a_wordpiece_vocabulary_exports_too(tmp_path):
    model_dir = make_wordpiece_bert(tmp_path / "wordpiece_bert")
    config = default.get_config()
    config.model, config.data.source = str(model_dir), str(FIXTURE)
    config.batch_size, config.epochs, config.optim.learning_rate = 2, 3, 0.5
    config.specialization, config.plots = False, False
    # Random weights: the best dev epoch may be any, so start from 30% pruned masks.
    config.mask.init, config.mask.init_sparsity = "target", 0.3
    train_and_evaluate(config, tmp_path / "run", **QUIET)
    run = load_run(tmp_path / "run")
    r = int(np.argmax(run.sparsity()["total"]))
    assert run.sparsity()["total"][r] > 0
    relation = run.relations[r]
    facts = read_lama_set(FIXTURE).facts
    prompt = next(f.sentences[0] for f in facts if f.relation == relation)
    assert_export_matches_predict(run, relation, prompt, tmp_path / "export")
