"""Benchmark: model quality against the simulator's ground truth (issue 3's targets).

Simulates a world, loads it, trains churn, next-best-offer and send-time (no MLflow: the pipelines only),
and prints each model's figure beside the oracle and the baselines measured in the same run:
  - churn: ROC AUC at truth_at against the AUC of the true churn probability (target >= 95%);
  - nbo: true expected profit of the learned policy against the oracle policy (>= 80%, above baselines);
  - send-time: true open rate at the chosen hour against the oracle hour (>= 90%, above the global hour).

Usage: python bench/bench_model_quality.py [--customers 20000] [--days 365] [--seed 7]
           [--models churn,nbo,send-time] [--reuse-world]
(``--reuse-world`` keeps a world simulated and loaded by an earlier run with the same arguments and only
rebuilds the feature snapshots and the feature store: quick iterations on features and models.)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--models", default="churn,nbo,send-time", help="comma-separated subset to train")
    parser.add_argument("--reuse-world", action="store_true",
                        help="keep an already simulated and loaded world; rebuild snapshots and the store only")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    from engage.config import load_config
    from features.load import ingest
    from features.simulate import simulate
    from features.truth import store_ground_truth
    from training import churn, next_best_offer, send_time
    from training.context import open_context

    work = args.workdir.resolve() / f"quality-{args.customers}-{args.days}-{args.seed}"
    src, home = work / "src", work / "home"
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"world: {args.customers:,} customers x {args.days} days, seed {args.seed}\n")
    if args.reuse_world and (home / "truth_loaded").exists():
        shutil.rmtree(home / "feature_data", ignore_errors=True)
        shutil.rmtree(home / "feast", ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        simulate(args.customers, args.days, args.seed, src, progress=False)
        ingest(src, home)
        store_ground_truth(src, home)
        (home / "truth_loaded").touch()

    results = {}
    with open_context(home, load_config()) as ctx:
        for name, module in (("churn", churn), ("nbo", next_best_offer), ("send-time", send_time)):
            if name not in models:
                continue
            started = time.perf_counter()
            results[name] = module.train(ctx).metrics
            print(f"trained {name} in {time.perf_counter() - started:.0f}s")

    def show(label: str, value: float | None, target: str = "") -> None:
        text = "n/a" if value is None else f"{value:.4f}"
        print(f"  {label:<44} {text:>8}  {target}")

    m = results.get("churn", {})
    print("\nchurn (holdout at truth_at, same customers)")
    show("model ROC AUC", m.get("truth_roc_auc"))
    show("oracle ROC AUC (true churn probability)", m.get("oracle_roc_auc"))
    show("ratio to oracle", m.get("auc_ratio_to_oracle"), "target >= 0.95")
    show("holdout ROC AUC (time-based)", m.get("roc_auc"))
    show("  logistic regression baseline", m.get("logreg_roc_auc"))
    show("  RFM rule baseline", m.get("rfm_rule_roc_auc"))

    m = results.get("nbo", {})
    print("\nnext-best-offer (true expected profit per customer at truth_at)")
    show("learned policy", m.get("true_profit_policy"))
    show("oracle policy", m.get("true_profit_oracle"))
    show("ratio to oracle", m.get("true_profit_ratio_to_oracle"), "target >= 0.80")
    for base in ("logging", "random", "best_single", "no_offer"):
        show(f"  {base} policy", m.get(f"true_profit_{base}"), "learned must beat it")
    show("DR policy value on held-out sends", m.get("dr_policy_value"))

    m = results.get("send-time", {})
    print("\nsend-time (true open probability at the chosen local hour)")
    show("ratio to oracle hour", m.get("true_open_ratio_to_oracle"), "target >= 0.90")
    show("  global best hour, ratio to oracle", m.get("true_open_ratio_global_hour"), "model must beat it")
    show("  random hour, ratio to oracle", m.get("true_open_ratio_random_hour"))
    show("hit rate of the true best hour", m.get("best_hour_hit_rate"))
    show("held-out open rate at chosen hour", m.get("holdout_open_rate_at_chosen_hour"))


if __name__ == "__main__":
    main()
