"""The README's "What the masks found" table, from sweeps of seeds (each run's metrics.json and
prompt_ranks_test.npz): every control as mean +- sample std over seeds, each difference with
the two-level (seeds, then held-out facts) interval.

    lamp-jax sweep --seeds 3 --workdir runs/by_fact
    lamp-jax sweep --seeds 3 --config.data.split=object_disjoint --workdir runs/object_disjoint
    lamp-jax sweep --seeds 3 --config.model_weights=random --workdir runs/random_weights
    python -m bench.evidence_table runs/by_fact runs/object_disjoint runs/random_weights
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def runs_of(sweep: Path) -> list:
    from lamp_jax.run_dir import RunDirectory

    return [RunDirectory(path) for path in sorted((sweep / "runs").iterdir())]


def mean_std(values) -> str:
    values = np.asarray(values, float)
    if np.isnan(values).all():
        return "nan"
    return (f"{values.mean():.3f} +- {values.std(ddof=1):.3f}" if len(values) > 1
            else f"{values[0]:.3f}")


def column(sweep: Path) -> dict[str, str]:
    from lamp_jax.analysis.evidence import seed_fact_bootstrap

    directories = runs_of(sweep)
    metrics = [d.metrics() for d in directories]
    controls = [m["controls"] for m in metrics]
    ranks = [d.prompt_ranks("test") for d in directories]
    relation, fact = ranks[0]["relation"], ranks[0]["fact"]
    num = len(metrics[0]["relations"])
    out = {
        "full model": mean_std([m["test"]["full"]["macro_P@1"] for m in metrics]),
        "relation prior": mean_std([c["prior"]["macro_P@1"] for c in controls]),
        "full model, typed": mean_std([c["full_typed"]["macro_P@1"] for c in controls]),
        "random masks": mean_std([c["random_masks"]["macro_P@1"] for c in controls]),
        "magnitude masks": mean_std([c["magnitude_masks"]["macro_P@1"] for c in controls]),
        "learned subnetworks": mean_std([m["test"]["pruned"]["macro_P@1"] for m in metrics]),
        "sparsity": mean_std([np.mean(m["sparsity"]["total"]) for m in metrics]),
        "relations' overlap / chance": mean_std(
            [c["overlap_between_relations"]["mean_ratio"] for c in controls]),
    }
    pruned = np.stack([r["pruned"] == 1 for r in ranks])
    others = {"full model": [r["full"] == 1 for r in ranks],
              "typed full model": [r["full_typed"] == 1 for r in ranks],
              "random masks": [np.mean(r["random"] == 1, axis=0) for r in ranks]}
    for name, other in others.items():
        interval = seed_fact_bootstrap(pruned, np.stack(other), relation, fact, num)
        out[f"minus {name}"] = (f"{interval.macro_observed:+.3f} [{interval.macro_low:+.3f}, "
                                f"{interval.macro_high:+.3f}]")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    args = parser.parse_args()
    columns = {sweep.name: column(sweep) for sweep in args.sweeps}
    names = list(columns)
    print("| test macro P@1 | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in next(iter(columns.values())):
        print(f"| {row} | " + " | ".join(columns[n][row] for n in names) + " |")
    if len(args.sweeps) > 1:  # the first sweep's subnetworks against the last one's
        from lamp_jax.analysis.evidence import seed_fact_bootstrap

        first, last = ([d.prompt_ranks("test") for d in runs_of(s)]
                       for s in (args.sweeps[0], args.sweeps[-1]))
        interval = seed_fact_bootstrap(np.stack([r["pruned"] == 1 for r in first]),
                                       np.stack([r["pruned"] == 1 for r in last]),
                                       first[0]["relation"], first[0]["fact"])
        print(f"\n{args.sweeps[0].name}'s subnetworks minus {args.sweeps[-1].name}'s: "
              f"{interval.macro_observed:+.3f} [{interval.macro_low:+.3f}, "
              f"{interval.macro_high:+.3f}]")


if __name__ == "__main__":
    main()
