"""train.py's run on a tiny local model: outputs, metrics, resume, notebook API, mask export."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.api import load_run
from lamp_jax.checkpoint import load_binary_masks, restore_best_masks
from lamp_jax.configs import default
from lamp_jax.data import read_lama_jsonl
from lamp_jax.masks import hard_mask, multiply_masks
from lamp_jax.models.bert import ModelConfig, init_params
from lamp_jax.models.params import save_mlm
from lamp_jax.sweep import with_overrides
from lamp_jax.trainer import train_and_evaluate
from tests import by_hand
from tests.needs import require
from tests.tokenizer_fixtures import make_bert_tokenizer, words_of

FIXTURE = Path(__file__).parent / "fixtures" / "lama_conceptnet_sample.jsonl"


def make_tiny_model(directory: Path) -> Path:
    """A random 2-layer BERT whose word-level vocabulary covers the fixture's words."""
    facts, _ = read_lama_jsonl(FIXTURE)
    texts = [s for f in facts for s in f.sentences] + [f.obj for f in facts]
    tokenizer = make_bert_tokenizer(directory, words_of(texts))
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    return save_mlm(directory, init_params(config, jax.random.key(0)), config, tokenizer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


def _config(model_dir, **overrides):
    c = default.get_config()
    c.model, c.data.source = str(model_dir), str(FIXTURE)
    c.batch_size, c.epochs, c.optim.learning_rate = 2, 3, 0.05
    return with_overrides(c, overrides)


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    summary = train_and_evaluate(_config(model_dir), workdir, log=lambda *_: None)
    return workdir, summary


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
    facts, _ = read_lama_jsonl(FIXTURE)
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
    # The test split's facts are exactly those whose prompts were counted in the test metrics.
    per_relation = summary["test"]["full"]["per_relation"]
    for relation, stats in per_relation.items():
        prompts = sum(len(r["sentences"]) for r in split["test"] if r["relation"] == relation)
        assert stats["count"] <= prompts and stats["count"] > 0


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
    macro = {}
    for name, params_of in kinds.items():
        want = by_hand.metrics_from_ranks(_ranks_by_hand(embedded_run_dir, run, params_of))
        _assert_metrics_equal(metrics[name], want)
        macro[name] = want["macro_P@1"]
    # Measured (20 epochs of the default): full 0.17, binary 0.50, soft 0.52. Non-zero and all
    # different, so expectation inference is neither the threshold nor the full model.
    assert 0 < macro["full"] < min(macro["pruned_expectation"], macro["pruned"])
    assert macro["pruned_expectation"] != macro["pruned"] and macro["pruned"] < 1


def test_config_fields_reach_the_step_and_the_evaluation(model_dir, tmp_path, monkeypatch):
    """loss.sparsity_weight, loss.target_sparsity, optim.weight_decay, dtype and mask.eval_kind
    reach the step and the ranking whose arithmetic tests/test_training.py checks against numpy.
    The run is stopped where its evaluation function is made, before any training."""
    import lamp_jax.trainer as trainer

    class Stop(Exception):
        pass

    seen = {}
    real_load, real_step = trainer.load_mlm, trainer.jit_train_step

    def load_mlm(*args, **kwargs):
        seen["mlm"] = real_load(*args, **kwargs)
        return seen["mlm"]

    def jit_train_step(**kwargs):
        seen["step"] = kwargs
        return real_step(**kwargs)

    def make_rank_fn(model_config, mode, **kwargs):
        seen["rank"] = mode, kwargs
        raise Stop

    monkeypatch.setattr(trainer, "load_mlm", load_mlm)
    monkeypatch.setattr(trainer, "jit_train_step", jit_train_step)
    monkeypatch.setattr(trainer.evaluation, "make_rank_fn", make_rank_fn)
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
    top = run.predict("You are likely to find a book in a [MASK].", relation="AtLocation", k=3)
    assert len(top) == 3 and all(isinstance(t, str) for t, _ in top)
    assert sum(p for _, p in top) <= 1.0 + 1e-6
    np.testing.assert_allclose(run.sparsity()["total"], summary["sparsity"]["total"])
    with pytest.raises(KeyError, match="unknown relation"):
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
    partial = train_and_evaluate(_config(model_dir, stop_after=4, specialization=False,
                                         plots=False), tmp_path, log=lambda *_: None)
    assert partial["stopped_at"] == 4
    resumed = train_and_evaluate(cfg, tmp_path, log=lambda *_: None)
    assert resumed["test"] == summary["test"]
    for a, b in zip(jax.tree.leaves(restore_best_masks(tmp_path)),
                    jax.tree.leaves(restore_best_masks(workdir)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_workdir_of_another_mask_layout_is_refused(finished_run, model_dir):
    workdir, _ = finished_run
    with pytest.raises(ValueError, match="masks with layers"):
        train_and_evaluate(_config(model_dir, **{"mask.first_layer": 0}), workdir,
                           log=lambda *_: None)
    trained = default.get_config().mask.mode
    other = "deterministic" if trained == "stochastic" else "stochastic"
    with pytest.raises(ValueError, match=f"masks with mode {trained}"):
        train_and_evaluate(_config(model_dir, **{"mask.mode": other}), workdir,
                           log=lambda *_: None)


def test_reevaluate_cli_reproduces_the_run_metrics(finished_run):
    from lamp_jax.evaluate import main

    workdir, summary = finished_run
    main(["--workdir", str(workdir)])
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
