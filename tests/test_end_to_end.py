"""train.py's run on a tiny local model: outputs, metrics, resume, notebook API, mask export."""

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.api import load_run
from lamp_jax.checkpoint import load_binary_masks
from lamp_jax.configs import default
from lamp_jax.data import read_lama_set
from lamp_jax.errors import UsageError
from lamp_jax.loop import train_and_evaluate
from lamp_jax.masks import hard_mask, multiply_masks
from lamp_jax.models import ModelConfig, init_params, save_mlm
from lamp_jax.run_dir import RunDirectory
from lamp_jax.sweep import with_overrides
from tests import by_hand
from tests.needs import require
from tests.tokenizer_fixtures import make_bert_tokenizer, words_of

FIXTURE = Path(__file__).parent / "fixtures" / "lama_conceptnet_sample.jsonl"


def make_tiny_model(directory: Path, hidden_size: int = 32) -> Path:
    """A random 2-layer BERT whose word-level vocabulary covers the fixture's words."""
    facts = read_lama_set(FIXTURE).facts
    texts = [s for f in facts for s in f.sentences] + [f.obj for f in facts]
    tokenizer = make_bert_tokenizer(directory, words_of(texts))
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=2,
                         num_heads=2, intermediate_size=64, max_position_embeddings=64)
    return save_mlm(directory, init_params(config, jax.random.key(0)), config, tokenizer)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir  # tests/conftest.py: built once per session


def _config(model_dir, **overrides):
    """The tiny run: 6 relations, 3 epochs of 2 steps. Mask logits start at 0.3, near the
    threshold, so that every relation's mask prunes from its first epoch on (measured: 33-36%
    of the weights at step 2, where this random model's best dev epoch always is)."""
    c = default.get_config()
    c.model, c.data.source = str(model_dir), str(FIXTURE)
    c.batch_size, c.epochs, c.optim.learning_rate = 2, 3, 0.5
    c.mask.init_value = 0.3
    return with_overrides(c, overrides)


@pytest.fixture(scope="module")
def finished_run(tiny_run):
    """``train_and_evaluate(_config(model_dir))``, trained once per session (tests/conftest.py);
    read-only: tests that write into it work on a copy."""
    return tiny_run


def test_the_shared_run_prunes_every_relation(finished_run):
    """What the other tests compare must not be all-ones masks, i.e. the full model."""
    _, summary = finished_run
    assert len(summary["relations"]) == 6
    assert all(0.2 < s < 0.5 for s in summary["sparsity"]["total"]), summary["sparsity"]


def test_run_writes_its_outputs(finished_run):
    workdir, summary = finished_run
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3
    assert "pruned_expectation" in summary["test"]
    assert set(summary["test"]["pruned"]) >= {"micro_P@2", "macro_P@3", "macro_MRR"}
    for name in ("run.json", "metrics.json", "masks.npz", "plots/p_at_1_per_relation.png",
                 "plots/sparsity_per_layer.png", "plots/specialization.png"):
        assert (workdir / name).exists(), name
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == summary["steps"]
    num = len(summary["relations"])
    assert np.asarray(summary["specialization"]).shape == (num, num)
    assert len(summary["history"]) == 3  # one dev evaluation per epoch


def test_the_run_records_which_facts_each_split_holds(finished_run):
    workdir, summary = finished_run
    split = json.loads((workdir / "split.json").read_text())
    facts = read_lama_set(FIXTURE).facts
    by_uuid = {f.uuid: f for f in facts}
    uuids = {name: [row["uuid"] for row in rows] for name, rows in split.items()}
    assert set(uuids) == {"train", "dev", "test"}
    assert not set(uuids["train"]) & set(uuids["test"]) and not set(uuids["dev"]) & set(
        uuids["test"])
    for rows in split.values():
        for row in rows:
            fact = by_uuid[row["uuid"]]
            assert (row["relation"], row["subject"], row["object"]) == (
                fact.relation, fact.subject, fact.obj)
            assert row["sentences"] == list(fact.sentences)
    # The test split's facts are exactly those whose prompts were counted in the test metrics:
    # every sentence of the fixture is a usable prompt (one [MASK], a one-token object).
    per_relation = summary["test"]["full"]["per_relation"]
    assert set(per_relation) == {row["relation"] for row in split["test"]}
    for relation, stats in per_relation.items():
        prompts = sum(len(r["sentences"]) for r in split["test"] if r["relation"] == relation)
        assert stats["count"] == prompts > 0, relation


def _ranks_by_hand(workdir, run, params_of) -> dict[str, list[int]]:
    """Rank of the object of every test prompt that split.json lists, by a plain forward pass
    without padding; ``params_of(r)`` gives the params relation r's prompts are scored with."""
    forward = by_hand.forward_fn(run.mlm.config)
    test = json.loads((workdir / "split.json").read_text())["test"]
    ranks = {}
    for r, relation in enumerate(run.relations):
        prompts = [(sentence, row["object"]) for row in test if row["relation"] == relation
                   for sentence in row["sentences"]]
        ranks[relation] = [rank for rank in by_hand.prompt_ranks(
            forward, params_of(r), run.mlm.tokenizer, prompts) if rank is not None]
    return ranks


def _assert_metrics_equal(got: dict, want: dict) -> None:
    assert got["count"] == want["count"]
    assert set(got["per_relation"]) == set(want["per_relation"])
    for relation, values in want["per_relation"].items():
        assert got["per_relation"][relation] == pytest.approx(values, rel=1e-6), relation
    pooled = {k: v for k, v in want.items() if k != "per_relation"}
    assert {k: got[k] for k in pooled} == pytest.approx(pooled, rel=1e-6)


def test_full_model_metrics_match_a_plain_forward(finished_run):
    """Independent check of the batched, sharded evaluation: unpadded prompts. This random
    model ranks no object in its top 10, so every P@k is 0; its MRR is not (measured 0.017)."""
    workdir, summary = finished_run
    run = load_run(workdir)
    want = by_hand.metrics_from_ranks(_ranks_by_hand(workdir, run, lambda r: run.mlm.params))
    _assert_metrics_equal(summary["test"]["full"], want)
    assert want["micro_MRR"] > 0.01  # not a comparison of zeros
    assert len({v["MRR"] for v in want["per_relation"].values()}) > 1


def test_embedded_run_metrics_match_a_plain_forward_with_masks_applied_by_hand(
        embedded_run_dir):
    """The embedded run's test metrics (8 devices, cached frozen prefix, relation chunks)
    against plain unpadded forward passes, for the full model, the binary subnetworks
    (kernel * 1[G > 0]) and the soft ones (kernel * sigmoid(G), expectation inference), each
    mask multiplied in here with numpy."""
    metrics = json.loads((embedded_run_dir / "metrics.json").read_text())["test"]
    run = load_run(embedded_run_dir)
    assert run.mode.kind == "threshold" and run.mode.threshold == 0.5
    paths = run.spec.paths()
    kinds = {"full": lambda r: run.mlm.params}
    for name, kind in (("pruned", "threshold"), ("pruned_expectation", "expectation")):
        kinds[name] = lambda r, kind=kind: by_hand.with_multipliers(
            run.mlm.params, by_hand.relation_multipliers(run.mask_logits, paths, r, kind))
    ranks = {}
    for name, params_of in kinds.items():
        ranks[name] = _ranks_by_hand(embedded_run_dir, run, params_of)
        _assert_metrics_equal(metrics[name], by_hand.metrics_from_ranks(ranks[name]))
    # Not a comparison of trivial values: the subnetworks beat the full model (measured on
    # an AMD EPYC, 20 epochs: full 0.17, binary 0.50, soft 0.52; binary and soft P@1 may be
    # equal on another CPU), and the three recomputations rank the prompts differently, so
    # the soft path is neither the binary one nor the full model.
    assert 0 < metrics["full"]["macro_P@1"] < min(metrics["pruned"]["macro_P@1"],
                                                  metrics["pruned_expectation"]["macro_P@1"])
    assert len({str(r) for r in ranks.values()}) == 3


def test_config_fields_reach_the_step_and_the_evaluation(model_dir, tmp_path, monkeypatch):
    """loss.sparsity_weight, loss.target_sparsity, optim.weight_decay, dtype and mask.eval_kind
    reach the step and the ranking whose arithmetic tests/test_training.py checks against numpy.
    The run is stopped where its evaluation function is made, before any training."""
    import lamp_jax.setup as setup_module

    class Stop(Exception):
        pass

    seen = {}
    real_load, real_step = setup_module.load_mlm, setup_module.jit_train_step

    def load_mlm(*args, **kwargs):
        seen["mlm"] = real_load(*args, **kwargs)
        return seen["mlm"]

    def jit_train_step(**kwargs):
        seen["step"] = kwargs
        return real_step(**kwargs)

    def make_rank_fn(model_config, mode, **kwargs):
        seen["rank"] = mode, kwargs
        raise Stop

    monkeypatch.setattr(setup_module, "load_mlm", load_mlm)
    monkeypatch.setattr(setup_module, "jit_train_step", jit_train_step)
    monkeypatch.setattr(setup_module, "make_rank_fn", make_rank_fn)
    config = _config(model_dir, **{"loss.sparsity_weight": 0.3, "loss.target_sparsity": 0.4,
                                   "optim.weight_decay": 0.01, "dtype": "bfloat16",
                                   "mask.eval_kind": "expectation"})
    with pytest.raises(Stop):
        train_and_evaluate(config, tmp_path, log=lambda *_: None)
    loss, optim = seen["step"]["loss_config"], seen["step"]["optim_config"]
    assert (loss.sparsity_weight, loss.target_sparsity) == (0.3, 0.4)
    assert optim.weight_decay == 0.01
    assert loss.compute_dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(seen["mlm"].params)} == {jnp.dtype(jnp.bfloat16)}
    mode, kwargs = seen["rank"]
    assert mode.kind == "expectation" and kwargs["dtype"] == jnp.bfloat16


def test_notebook_api_and_mask_export(finished_run):
    workdir, summary = finished_run
    run = load_run(workdir)
    assert run.relations == tuple(summary["relations"])
    prompt = "You are likely to find a book in a [MASK]."
    r = run.relation_index("AtLocation")
    for relation, params in (("AtLocation", by_hand.with_multipliers(
            run.mlm.params, by_hand.relation_multipliers(run.mask_logits, run.spec.paths(), r,
                                                         "threshold"))),
                             (None, run.mlm.params)):
        # predict's top 3 equals a plain forward's softmax with the mask applied by hand.
        tokens = run.mlm.tokenizer(prompt.replace("[MASK]", run.mlm.tokenizer.mask_token))
        ids = np.asarray([tokens["input_ids"]], np.int32)
        logits = np.asarray(by_hand.forward_fn(run.mlm.config)(params, ids, np.ones_like(ids))[
            "logits"][0, tokens["input_ids"].index(run.mlm.tokenizer.mask_token_id)], np.float64)
        probs = np.exp(by_hand.log_softmax(logits))
        top = np.argsort(-probs)[:3]
        got = run.predict(prompt, relation=relation, k=3)
        assert [t for t, _ in got] == run.mlm.tokenizer.convert_ids_to_tokens(top.tolist())
        np.testing.assert_allclose([p for _, p in got], probs[top], rtol=1e-4)
    # The subnetwork is not the full model: its top-3 probabilities differ.
    assert (run.predict(prompt, relation="AtLocation", k=3) != run.predict(prompt, k=3))
    np.testing.assert_allclose(run.sparsity()["total"], summary["sparsity"]["total"])
    with pytest.raises(UsageError, match="unknown relation 'NoSuchRelation'; this run has "):
        run.masked_params("NoSuchRelation")

    bits, spec, relations = load_binary_masks(workdir / "masks.npz")
    assert relations == run.relations and spec == run.spec
    for packed, logits in zip(jax.tree.leaves(bits), jax.tree.leaves(run.mask_logits),
                              strict=True):
        np.testing.assert_array_equal(packed, hard_mask(np.asarray(logits), 0.5))
    r = run.relation_index("AtLocation")
    from_bits = multiply_masks(run.mlm.params, jax.tree.map(lambda b: b[r], bits))
    for a, b in zip(jax.tree.leaves(from_bits), jax.tree.leaves(run.masked_params("AtLocation")),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_interrupted_run_resumes_to_the_same_result(finished_run, model_dir, tmp_path):
    workdir, summary = finished_run
    cfg = _config(model_dir, specialization=False, plots=False)
    said = []
    partial = train_and_evaluate(_config(model_dir, stop_after=4, specialization=False,
                                         plots=False), tmp_path, log=said.append)
    assert partial["stopped_at"] == 4 < summary["steps"] == 6  # stopped before the end
    assert not (tmp_path / "metrics.json").exists() and partial["resumed_from"] == []
    said = []
    resumed = train_and_evaluate(cfg, tmp_path, log=said.append)
    # It resumed, from the step it stopped at: the log and the run's own record say so.
    assert "resumed from step 4" in said and resumed["resumed_from"] == [4]
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in summary["history"]]
    assert resumed["test"] == summary["test"]
    # The final state's masks (step 6) and the best masks equal the uninterrupted run's.
    for a, b in zip(jax.tree.leaves(RunDirectory(tmp_path).latest_masks()),
                    jax.tree.leaves(RunDirectory(workdir).latest_masks()), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(RunDirectory(tmp_path).best_masks()),
                    jax.tree.leaves(RunDirectory(workdir).best_masks()), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "masks.npz").read_bytes() == (workdir / "masks.npz").read_bytes()


def test_workdir_of_another_model_relation_set_or_mask_layout_is_refused(
        finished_run, model_dir, tmp_path):
    """Refused before anything is written, with every mismatch named."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    before = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    trained = default.get_config().mask.mode
    other = "deterministic" if trained == "stochastic" else "stochastic"
    other_model = make_tiny_model(tmp_path / "other", hidden_size=16)
    cases = [
        (_config(model_dir, **{"data.relations": ("AtLocation", "IsA")}),
         [r"relations: \[.*'Desires'.*\] here, \['AtLocation', 'IsA'\] now"]),
        (_config(other_model), ["model_config: {.*'hidden_size': 32.*} here, {.*'hidden_size': "
                                "16.*} now"]),
        (_config(model_dir, **{"mask.first_layer": 0}), [r"mask layers: \[1\] here, \[0, 1\] now"]),
        (_config(model_dir, **{"mask.mode": other, "data.relations": ("AtLocation", "IsA")}),
         [f"mask mode: {trained} here, {other} now", "relations: "]),
    ]
    for config, patterns in cases:
        with pytest.raises(ValueError, match="holds another run") as err:
            train_and_evaluate(config, workdir, log=lambda *_: None)
        for pattern in patterns:  # each mismatch on a line of its own
            assert any(re.search(pattern, line) for line in str(err.value).splitlines()), (
                pattern, str(err.value))
    after = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    assert after == before


def test_reevaluate_cli_reproduces_the_run_metrics(finished_run, tmp_path):
    from lamp_jax.cli import main

    workdir, summary = tmp_path / "run", finished_run[1]
    shutil.copytree(finished_run[0], workdir)
    assert main(["evaluate", "--workdir", str(workdir)]) == 0
    again = json.loads((workdir / "eval_test.json").read_text())
    assert again["test"] == summary["test"]
    np.testing.assert_equal(again["specialization"], summary["specialization"])  # NaN: no prompts


# Our matrix names -> the module of transformers' BertLayer whose weight they mask.
TORCH_MODULES = {"query": "attention.self.query", "key": "attention.self.key",
                 "value": "attention.self.value", "attn_out": "attention.output.dense",
                 "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}


def test_embedded_run_metrics_recomputed_from_its_files_with_transformers_pytorch(
        embedded_run_dir):
    """Anyone can recompute a run's test metrics without our code: the facts from split.json,
    the binary masks from masks.npz (unpacked with numpy), the model from its hub-format
    directory through transformers' PyTorch BertForMaskedLM, one prompt at a time."""
    torch = require("torch")
    transformers = require("transformers")
    run = json.loads((embedded_run_dir / "run.json").read_text())
    metrics = json.loads((embedded_run_dir / "metrics.json").read_text())["test"]["pruned"]
    model_dir = Path(run["model"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    test = json.loads((embedded_run_dir / "split.json").read_text())["test"]
    with np.load(embedded_run_dir / "masks.npz") as packed:
        meta = json.loads(str(packed["__meta__"]))
        masks = {name: np.unpackbits(packed[name], count=int(np.prod(packed[name + ".shape"])))
                 .reshape(tuple(packed[name + ".shape"])) for name in packed.files
                 if name != "__meta__" and not name.endswith(".shape")}
    assert meta["relations"] == run["relations"] and len(masks) == 2 * 6
    model = transformers.BertForMaskedLM.from_pretrained(model_dir).eval()
    modules = {}
    for name in masks:
        layer, matrix = name.split("/")
        module = model.bert.encoder.layer[int(layer.split("_")[1])]
        for attribute in TORCH_MODULES[matrix].split("."):
            module = getattr(module, attribute)
        modules[name] = (module, module.weight.detach().clone())
    ranks = {}
    for r, relation in enumerate(run["relations"]):
        with torch.no_grad():
            for name, (module, full) in modules.items():  # torch's weight is [out, in]
                module.weight.copy_(full * torch.from_numpy(masks[name][r].T.astype(np.float32)))
            ranks[relation] = []
            for fact in (f for f in test if f["relation"] == relation):
                for sentence in fact["sentences"]:
                    ids = tokenizer(sentence.replace("[MASK]", tokenizer.mask_token),
                                    return_tensors="pt")["input_ids"]
                    target = tokenizer.convert_tokens_to_ids(fact["object"].lower())
                    position = int((ids[0] == tokenizer.mask_token_id).nonzero()[0, 0])
                    scores = model(input_ids=ids).logits[0, position]
                    ranks[relation].append(1 + int((scores > scores[target]).sum()))
    want = by_hand.metrics_from_ranks(ranks)
    assert want["count"] == metrics["count"] > 100
    for relation, values in want["per_relation"].items():
        assert metrics["per_relation"][relation]["P@1"] == pytest.approx(values["P@1"]), relation
        assert metrics["per_relation"][relation]["MRR"] == pytest.approx(values["MRR"], rel=1e-3)
    assert metrics["macro_P@1"] == pytest.approx(want["macro_P@1"])
    assert 0.2 < want["macro_P@1"] < 1  # subnetworks that work, not a comparison of zeros


def test_the_controls_equal_plain_forwards_and_counts_from_the_run_files(embedded_run_dir):
    """Every control of the embedded run's report (metrics.json "controls"), recomputed from
    its files without lamp_jax's ranking: the typed full model and subnetworks by plain
    forward passes and an argmax over the relation's training objects (split.json), the
    relation prior by counting split.json's training facts, and each interval's observed
    difference from those per-relation values."""
    metrics = json.loads((embedded_run_dir / "metrics.json").read_text())
    controls = metrics["controls"]
    split = json.loads((embedded_run_dir / "split.json").read_text())
    run = load_run(embedded_run_dir)
    tok, forward = run.mlm.tokenizer, by_hand.forward_fn(run.mlm.config)
    token = lambda word: tok(word, add_special_tokens=False)["input_ids"]  # noqa: E731
    typed = {"full_typed": {}, "pruned_typed": {}}
    prior = {}
    for r, relation in enumerate(run.relations):
        train = [f["object"] for f in split["train"] if f["relation"] == relation]
        ids = [token(o)[0] for o in train if len(token(o)) == 1]
        prompts = [(s, row["object"]) for row in split["test"] if row["relation"] == relation
                   for s in row["sentences"]]
        pruned = by_hand.with_multipliers(run.mlm.params, by_hand.relation_multipliers(
            run.mask_logits, run.spec.paths(), r, "threshold"))
        for name, params in (("full_typed", run.mlm.params), ("pruned_typed", pruned)):
            hits = [h for h in by_hand.typed_top(forward, params, tok, prompts, ids)
                    if h is not None]
            typed[name][relation] = float(np.mean(hits))
        counts = {}
        for i in ids:  # distinct training facts per object; ties: the smallest token id
            counts[i] = counts.get(i, 0) + 1
        top = min(counts, key=lambda i: (-counts[i], i))
        answers = [token(o) for _, o in prompts]
        prior[relation] = float(np.mean([a == [top] for a in answers if len(a) == 1]))
    for name, values in typed.items():
        got = {r: v["P@1"] for r, v in controls[name]["per_relation"].items()}
        assert got == pytest.approx(values, abs=1e-9), name
        assert controls[name]["macro_P@1"] == pytest.approx(np.mean(list(values.values())))
    assert {r: v["P@1"] for r, v in controls["prior"]["per_relation"].items()} == \
        pytest.approx(prior, abs=1e-9)
    full = {r: v["P@1"] for r, v in metrics["test"]["full"]["per_relation"].items()}
    pruned = {r: v["P@1"] for r, v in metrics["test"]["pruned"]["per_relation"].items()}
    for key, other in (("pruned - full", full), ("pruned - full_typed", typed["full_typed"]),
                       ("pruned - prior", prior)):
        interval = controls["intervals"][key]
        want = {r: pruned[r] - other[r] for r in run.relations}
        assert {r: v["observed"] for r, v in interval["per_relation"].items()} == \
            pytest.approx(want, abs=1e-9), key
        assert interval["macro"]["low"] <= interval["macro"]["observed"] <= \
            interval["macro"]["high"]
    # Not trivial: the typed ranking raises the full model, and the subnetworks beat both.
    assert (metrics["test"]["full"]["macro_P@1"] < controls["full_typed"]["macro_P@1"]
            < metrics["test"]["pruned"]["macro_P@1"])
    assert 0 < controls["prior"]["macro_P@1"] < controls["full_typed"]["macro_P@1"]
    random = controls["random_masks"]
    assert random["draws"] == 5 and len(set(random["macro_P@1_per_draw"])) > 1
