"""Relation subnetworks of causal LMs, as a user runs them: ``train.py --config=configs/
gpt2_trex.py`` on a random GPT-2 (and a Llama-architecture model) that transformers saved and a
LAMA data folder in the official layout, in fresh processes; the run opens in ``load_run`` in
another one; the full model's ranks equal a plain transformers PyTorch computation of the
same candidate scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lamp_jax.data.lama_sets import read_lama_set
from tests.needs import require
from tests.test_lama_sets import write_lama_data
from tests.tokenizer_fixtures import make_causal_tokenizer, words_of

torch = require("torch")
transformers = require("transformers")

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"gpt2": None, "llama": "<|begin_of_text|>"}  # kind -> the tokenizer's BOS
CONFIGS = {"gpt2": "configs/gpt2_trex.py", "llama": "configs/qwen2_5_0_5b_trex.py"}
MATRICES = {"gpt2": ["qkv", "attn_out", "ffn_in", "ffn_out"],
            "llama": ["query", "key", "value", "attn_out", "ffn_gate", "ffn_in", "ffn_out"]}


def _model(directory: Path, kind: str, data: Path) -> Path:
    """A random causal LM of ``kind`` whose byte-level vocabulary has every word of the T-REx
    fixture's templates and objects as one token after a space."""
    facts = read_lama_set(data, "trex").facts
    words = words_of([s for f in facts for s in f.sentences] + [f.obj for f in facts])
    tokenizer = make_causal_tokenizer(directory, words, bos=KINDS[kind])
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32,
                                         n_layer=2, n_head=2, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = transformers.LlamaForCausalLM(config)
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(KINDS))
def trained(request, tmp_path_factory):
    """``python train.py --config=configs/gpt2_trex.py`` (``qwen2_5_0_5b_trex.py``) on the
    fixture, in a fresh process, in float32 (to compare with PyTorch)."""
    kind = request.param
    base = tmp_path_factory.mktemp(f"causal_{kind}")
    data = write_lama_data(base / "data")
    model = _model(base / "model", kind, data)
    workdir = base / "run"
    out = subprocess.run(
        [sys.executable, "train.py", f"--config={CONFIGS[kind]}", "--config.dtype=float32",
         "--config.optim.moment_dtype=float32",
         f"--config.model={model}", f"--config.data.source={data}", f"--workdir={workdir}",
         "--config.mask.first_layer=0", "--config.mask.last_layer=1", "--config.epochs=3",
         "--config.batch_size=2", "--config.optim.learning_rate=0.5",
         "--config.mask.init_value=0.3", "--config.plots=False",
         "--config.controls.random_draws=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return kind, model, data, workdir, out.stdout + out.stderr


def test_a_causal_run_trains_prunes_and_counts_what_it_could_not_read(trained):
    kind, _, _, workdir, output = trained
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert all(s > 0.05 for s in metrics["sparsity"]["total"]), metrics["sparsity"]
    # P106's template, "[X] is a [Y] by profession .", has text after [Y]: a causal LM cannot
    # read it, and its prompts are dropped and counted; so is the relation, left without any.
    assert set(metrics["test"]["pruned"]["per_relation"]) == {"P19", "P20", "P36", "P37"}
    assert "answer_not_last=6" in output and "relations skipped: 1 (P106)" in output
    run = json.loads((workdir / "run.json").read_text())
    assert run["model_config"]["model_type"] == kind
    assert run["mask"]["matrices"] == MATRICES[kind]


def _torch_ranks(model_dir: Path, workdir: Path, kind: str) -> dict[str, list[int]]:
    """Each test prompt's rank among its relation's objects (those of every split), by summed
    token log-probabilities after the prefix, with transformers' PyTorch model."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model_class = (transformers.GPT2LMHeadModel if kind == "gpt2"
                   else transformers.LlamaForCausalLM)
    model = model_class.from_pretrained(model_dir, attn_implementation="eager").eval()
    split = json.loads((workdir / "split.json").read_text())
    objects: dict[str, set[str]] = {}
    for rows in split.values():
        for row in rows:
            objects.setdefault(row["relation"], set()).add(row["object"])
    bos = [tokenizer.bos_token_id] if KINDS[kind] else []
    ranks: dict[str, list[int]] = {}
    for row in split["test"]:
        for sentence in row["sentences"]:
            prefix = bos + tokenizer(sentence.split("[MASK]")[0].rstrip(),
                                     add_special_tokens=False)["input_ids"]
            scores = {}
            for obj in objects[row["relation"]]:
                answer = tokenizer(" " + obj, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prefix + answer[:-1]])
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1).numpy()
                scores[obj] = sum(logp[len(prefix) - 1 + j, t] for j, t in enumerate(answer))
            gold = scores[row["object"]]
            ranks.setdefault(row["relation"], []).append(
                1 + sum(s > gold for s in scores.values()))
    return ranks


def test_the_full_models_ranks_equal_transformers_pytorch(trained):
    kind, model, _, workdir, _ = trained
    full = json.loads((workdir / "metrics.json").read_text())["test"]["full"]["per_relation"]
    ranks = _torch_ranks(model, workdir, kind)
    assert set(ranks) == set(full)
    for relation, values in ranks.items():
        values = np.asarray(values, float)
        assert full[relation]["count"] == len(values)
        assert full[relation]["P@1"] == pytest.approx(np.mean(values == 1)), relation
        assert full[relation]["MRR"] == pytest.approx(np.mean(1 / values)), relation
    assert len({v for r in ranks.values() for v in r}) > 2  # the ranks are not all alike


def test_a_causal_run_opens_and_predicts_in_a_fresh_process(trained):
    kind, _, _, workdir, _ = trained
    code = (f"import json, lamp_jax; run = lamp_jax.load_run({str(workdir)!r}); "
            "print(json.dumps([run.predict('The capital of France is [MASK] .', "
            "relation='P36', k=3), run.predict('The capital of France is [MASK] .', k=3, "
            "among='P36'), run.evaluate('test').macro(1)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    pruned, full, macro = json.loads(out.stdout.strip().splitlines()[-1])
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert macro == pytest.approx(metrics["test"]["pruned"]["macro_P@1"])
    capitals = {"Paris", "Rome", "Vienna", "Warsaw", "Madrid", "Tokyo", "New Delhi"}
    for top in (pruned, full):
        assert len(top) == 3 and {t for t, _ in top} <= capitals
        assert all(0 < p <= 1 for _, p in top) and top[0][1] >= top[1][1] >= top[2][1]
    cli = subprocess.run([sys.executable, "-m", "lamp_jax", "predict", str(workdir),
                          "The capital of France is [MASK] .", "--relation", "P36", "-k", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert pruned[0][0] in cli.stdout


def test_an_exported_causal_subnetwork_generates_what_our_forward_generates(trained, tmp_path):
    """``export_subnetwork`` of a causal run: a checkpoint transformers opens as a causal LM,
    whose greedy ``generate`` continues a prompt as a greedy loop over our forward with the
    relation's mask applied, and that differs from the full model's weights."""
    from lamp_jax import load_run
    from tests.test_causal_models import _greedy

    kind, model, _, workdir, _ = trained
    run = load_run(workdir)
    exported = run.export_subnetwork("P36", tmp_path / "P36")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = np.asarray([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        theirs = torch_model.generate(torch.tensor(prompt), max_new_tokens=4, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id).numpy()
    ours = _greedy(run.masked_params("P36"), run.mlm.config, prompt, 4)
    np.testing.assert_array_equal(theirs, ours)
    original = transformers.AutoModelForCausalLM.from_pretrained(model)
    name = ("transformer.h.0.mlp.c_fc.weight" if kind == "gpt2"
            else "model.layers.0.mlp.up_proj.weight")
    pruned = dict(torch_model.named_parameters())[name].detach().numpy()
    full = dict(original.named_parameters())[name].detach().numpy()
    assert 0.05 < np.mean((pruned == 0) & (full != 0)) < 0.95  # the mask was applied
