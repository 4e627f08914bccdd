"""A run and its report over several seeds: mean +- std of every figure the README quotes.

    python -m bench.seeds --seeds 3                      # the embedded default, seeds 0, 1, 2
    python -m bench.seeds --seeds 3 --ckbc ../shared/data/conceptnet_ckbc/test.txt

Each seed is a whole ``train.py`` run (:func:`lamp_jax.loop.train_and_evaluate`) followed by
``python -m lamp_jax.report`` on it; ``--config.seed`` sets the mask init, the noise and the
batch order, while the held-out facts stay those of ``data.seed``. Prints one line per figure:
mean +- sample std, then the per-seed values. Seed 0's plots are the README's images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np


def run_figures(summary: dict, report_dir: Path) -> dict[str, float]:
    """The figures of one run: its metrics.json summary and its report's json files."""
    test = summary["test"]
    figures = {}
    for name, key in (("full", "full"), ("binary", "pruned"), ("soft", "pruned_expectation")):
        if key not in test:  # eval_kind "expectation": "pruned" is soft, the other binary
            key = "pruned_threshold" if name == "binary" else "pruned"
        for metric in ("macro_P@1", "micro_P@1", "macro_MRR"):
            figures[f"test {metric} {name}"] = test[key][metric]
    sparsity = np.asarray(summary["sparsity"]["total"])
    figures["sparsity mean"], figures["sparsity min"] = sparsity.mean(), sparsity.min()
    figures["sparsity max"] = sparsity.max()
    read = lambda name: json.loads((report_dir / f"{name}.json").read_text())  # noqa: E731
    spec = read("specialization")
    figures["specialization own"] = spec["own_mask_macro_P@1"]
    figures["specialization others"] = spec["other_masks_macro_P@1"]
    combination = read("combination")
    figures["combination best dev macro P@1"] = combination["best"]["score"]
    figures["combination full dev macro P@1"] = combination["full_model_dev_macro_P@1"]
    for source, result in read("kbc").items():
        if "full" in result:
            name = "world" if source.startswith("embedded") else "ckbc"
            for metric in ("Hits@1", "MRR"):
                figures[f"kbc {name} {metric} full"] = result["full"][metric]
                figures[f"kbc {name} {metric} subnetwork"] = result["subnetwork"][metric]
    rep = read("representations")
    figures["silhouette full"] = rep["full model"]["silhouette"]
    figures["silhouette own subnetwork"] = rep["own subnetwork"]["silhouette"]
    figures["train seconds"] = summary["train_seconds"]
    return figures


def qa_figures(workdir: Path, path: str, relations: list[str]) -> dict[str, float]:
    from lamp_jax.api import load_run
    from lamp_jax.report import qa_section

    run = load_run(workdir)
    figures = {}
    for method in ("or", "soft"):
        result = qa_section(run, path, "csqa", relations, method)
        figures["qa full"] = result["full_accuracy"]
        figures[f"qa {method} of {'+'.join(relations)}"] = result["combined_accuracy"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config", default="default", help="a packaged config's name or a file")
    parser.add_argument("--workdir", default="/tmp/lamp_seeds")
    parser.add_argument("--ckbc", default=None, help="ConceptNet triples for the report's KBC")
    parser.add_argument("--qa", default=None, help="a CommonsenseQA jsonl: zero-shot accuracy "
                        "of the full model and of the OR and soft combinations of "
                        "--qa-relations' subnetworks")
    parser.add_argument("--qa-relations", default="AtLocation,MadeOf,IsA")
    args = parser.parse_args()

    from lamp_jax.cli import resolve_config_argument
    from lamp_jax.loop import train_and_evaluate
    from lamp_jax.report import write_report

    path = resolve_config_argument([f"--config={args.config}"])[0].split("=", 1)[1]
    spec = importlib.util.spec_from_file_location("seeds_config", path)
    per_seed: list[dict[str, float]] = []
    for seed in range(args.seeds):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        config.seed = seed
        workdir = Path(args.workdir) / f"seed_{seed}"
        if workdir.exists():  # train.py would resume the finished run: no figures to time
            raise SystemExit(f"{workdir} exists; pick another --workdir or delete it")
        start = time.perf_counter()
        summary = train_and_evaluate(config, workdir, log=lambda *_: None)
        wall = time.perf_counter() - start
        write_report(workdir, args.ckbc, log=lambda *_: None)
        figures = run_figures(summary, workdir / "report")
        if args.qa:
            figures.update(qa_figures(workdir, args.qa, args.qa_relations.split(",")))
        figures["run wall seconds"] = wall
        per_seed.append(figures)
        print(f"seed {seed}: test macro P@1 binary {figures['test macro_P@1 binary']:.3f}, "
              f"soft {figures['test macro_P@1 soft']:.3f} ({wall:.1f} s); {workdir}")
    print(f"\n{args.config}, seeds 0..{args.seeds - 1}: mean +- sample std (per seed)")
    for key in per_seed[0]:
        values = np.array([f[key] for f in per_seed if key in f])
        std = values.std(ddof=1) if len(values) > 1 else float("nan")
        print(f"{key:<38} {values.mean():8.3f} +- {std:.3f}   "
              f"({' / '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
