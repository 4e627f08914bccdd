"""Every model family on every LAMA set: the README's families x datasets table.

Each cell reads its set from LAMA's own files (written by ``tests/test_lama_sets.py``'s
``write_lama_data``), encodes it with the family's tokenizer, and checks every prompt against
transformers' own ``pipeline("fill-mask")`` on a random model of that family saved with
``save_pretrained``: the token ids, the object's token, the object's probability and the top 3
that our Flax model gives. Then one short ``train_and_evaluate`` per family (on the set no other
test trains that family on) shows that the whole run works for it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lamp_jax.data.encode import encode_facts
from lamp_jax.data.lama_sets import read_lama_set
from lamp_jax.models import FAMILIES as MODEL_FAMILIES
from lamp_jax.models import load_mlm, mlm_forward
from lamp_jax.models.checkpoint_io import TOKENIZER_CLASSES, load_tokenizer_of
from tests.needs import require
from tests.test_lama_sets import write_lama_data
from tests.tokenizer_fixtures import (
    make_bert_tokenizer,
    make_modernbert_tokenizer,
    make_roberta_tokenizer,
    words_of,
)

torch = require("torch")
transformers = require("transformers")

FAMILIES = ("bert", "roberta", "distilbert", "modernbert")
SETS = ("conceptnet", "trex", "google_re")
SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48)


def _hf_model(family: str, tokenizer):
    """A random transformers MLM of ``family`` over ``tokenizer``'s vocabulary, its weights
    redrawn at unit scale (transformers' std 0.02 gives near-uniform probabilities, where a
    wrong token or position would hardly move a score)."""
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=vocab, max_position_embeddings=64,
                                      pad_token_id=pad, **SMALL)
        model = transformers.BertForMaskedLM(cfg)
    elif family == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=vocab, max_position_embeddings=66,
                                         pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, **SMALL)
        model = transformers.RobertaForMaskedLM(cfg)
    elif family == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=4, n_heads=4,
                                            hidden_dim=48, max_position_embeddings=64,
                                            pad_token_id=pad)
        model = transformers.DistilBertForMaskedLM(cfg)
    else:
        cfg = transformers.ModernBertConfig(
            vocab_size=vocab, max_position_embeddings=64, local_attention=4,
            pad_token_id=pad, cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id, attn_implementation="eager", **SMALL)
        model = transformers.ModernBertForMaskedLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name.lower():
                p.normal_(1.0, 0.2)
            elif "embeddings" in name:
                p.normal_(0.0, 1.0)
            else:  # a linear layer [out, in]: unit-scale outputs
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model.eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_lama_data(tmp_path_factory.mktemp("lama") / "data")


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir) -> dict[str, Path]:
    """family -> a directory with a random model of that family and a tokenizer whose
    vocabulary covers every word of the three sets (as save_pretrained writes them)."""
    texts = []
    for lama_set in SETS:
        for fact in read_lama_set(data_dir, lama_set).facts:
            texts += [*fact.sentences, fact.obj]
    words = words_of(texts)
    makers = {"bert": make_bert_tokenizer, "distilbert": make_bert_tokenizer,
              "roberta": make_roberta_tokenizer, "modernbert": make_modernbert_tokenizer}
    directories = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        tokenizer = makers[family](directory, words)
        _hf_model(family, tokenizer).save_pretrained(directory)
        directories[family] = directory
    return directories


@pytest.mark.parametrize("lama_set", SETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_prompt_is_encoded_and_scored_as_transformers_fill_mask_does(
        models, data_dir, family, lama_set):
    from transformers import pipeline

    data = read_lama_set(data_dir, lama_set)
    mlm = load_mlm(models[family])
    assert mlm.config.family == family
    encoded, report = encode_facts(data.facts, mlm.tokenizer, data.relations)
    # Every fact has one prompt here but ConceptNet's, whose facts may have several.
    assert report.kept == len(encoded.obj_id) > 0
    logits = mlm_forward(mlm.params, encoded.input_ids, encoded.attention_mask,
                         config=mlm.config, output_positions=encoded.mask_pos)["logits"]
    probs = np.asarray(jax.nn.softmax(logits))
    fill = pipeline("fill-mask", model=str(models[family]), device="cpu", top_k=3)
    space = "Ġ" if report.space_prefixed else ""
    checked = 0
    for row, fact_index in enumerate(encoded.fact_index):
        fact = data.facts[fact_index]
        if len(fact.sentences) != 1:  # a row names its fact, not which of its sentences
            continue
        sentence = fact.sentences[0].replace("[MASK]", mlm.tokenizer.mask_token)
        n = int(encoded.attention_mask[row].sum())
        ids = list(encoded.input_ids[row, :n])
        assert ids == list(fill.preprocess(sentence)["input_ids"][0].numpy()), sentence
        assert ids[int(encoded.mask_pos[row])] == mlm.tokenizer.mask_token_id
        obj = fact.obj.lower() if family in ("bert", "distilbert") else fact.obj
        assert mlm.tokenizer.convert_ids_to_tokens(int(encoded.obj_id[row])) == space + obj
        [scored] = fill(sentence, targets=[(" " if space else "") + obj])
        assert scored["token"] == encoded.obj_id[row], sentence
        np.testing.assert_allclose(probs[row, encoded.obj_id[row]], scored["score"],
                                   rtol=1e-4, atol=1e-6)
        top = fill(sentence)
        assert [t["token"] for t in top] == list(np.argsort(-probs[row])[:3]), sentence
        checked += 1
    assert checked >= 5


# The families and the set that no other test trains, so that every family and every set
# trains somewhere: BERT trains on ConceptNet (test_end_to_end) and T-REx (test_lama_sets),
# ModernBERT on ConceptNet (test_modernbert).
TRAINED_HERE = [("roberta", "google_re"), ("distilbert", "trex")]


@pytest.mark.slow
@pytest.mark.parametrize("family,lama_set", TRAINED_HERE)
def test_a_short_run_trains_prunes_and_opens(models, data_dir, tmp_path, family, lama_set):
    from lamp_jax.api import load_run
    from lamp_jax.configs import default
    from lamp_jax.loop import train_and_evaluate

    c = default.get_config()
    c.model, c.data.source, c.data.lama_set = str(models[family]), str(data_dir), lama_set
    c.mask.matrices = MODEL_FAMILIES[
        "modernbert" if family == "modernbert" else "bert"].default_matrices
    c.mask.first_layer, c.mask.last_layer = 2, 3
    c.batch_size, c.epochs, c.optim.learning_rate = 4, 2, 0.5
    c.mask.init, c.mask.init_sparsity = "target", 0.3  # random weights: start 30% pruned
    c.specialization, c.plots = False, False
    summary = train_and_evaluate(c, tmp_path / "run", log=lambda *_: None)
    run = load_run(tmp_path / "run")
    data = read_lama_set(data_dir, lama_set)
    assert run.relations == data.relations
    assert summary["test"]["pruned"]["count"] > 0
    total = summary["sparsity"]["total"]  # per relation, over every masked matrix
    assert len(total) == len(data.relations) and all(0.0 < s < 1.0 for s in total), total
    prompt = next(f.sentences[0] for f in data.facts if f.relation == data.relations[0])
    assert run.predict(prompt, relation=data.relations[0]) != run.predict(prompt)


def _without_tokenizer_class(path: Path) -> dict:
    content = json.loads(path.read_text())
    content.pop("tokenizer_class", None)
    path.write_text(json.dumps(content))
    return content


@pytest.mark.parametrize("named_by", ["tokenizer_config.json", "config.json", "the family"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_tokenizer_is_the_one_autotokenizer_loads(models, tmp_path, family, named_by):
    """load_mlm's tokenizer is AutoTokenizer's, by its class and by what it encodes, whether
    the checkpoint names the class in tokenizer_config.json (as save_pretrained writes it),
    only in config.json, or nowhere (as bert-base-uncased and roberta-base on the hub)."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    directory = tmp_path / family
    shutil.copytree(models[family], directory)
    named = json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"]
    if named_by != "tokenizer_config.json":
        _without_tokenizer_class(directory / "tokenizer_config.json")
    if named_by == "config.json":
        config = _without_tokenizer_class(directory / "config.json")
        (directory / "config.json").write_text(json.dumps(dict(config, tokenizer_class=named)))
    ours = load_tokenizer_of(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert type(ours) is type(theirs)
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    assert TOKENIZER_CLASSES[model_type] == TOKENIZER_MAPPING_NAMES[model_type]
    texts = ["a cat is a kind of " + theirs.mask_token + " .", " the cat lives in a house ."]
    assert ours(texts)["input_ids"] == theirs(texts)["input_ids"]
    assert ours.mask_token_id == theirs.mask_token_id


def test_loading_any_family_does_not_import_torch(models):
    """lamp-jax never needs torch at run time (it is a test reference here), and loading a
    model does not import it where it is installed (AutoTokenizer would: 1.6 s, 190 MB)."""
    code = ("import sys\nfrom lamp_jax.models import load_mlm\n"
            "for path in sys.argv[1:]:\n    load_mlm(path)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code, *map(str, models.values())],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
