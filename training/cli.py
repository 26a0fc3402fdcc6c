"""`engage train` and `engage models list|compare|promote`."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer
from rich.table import Table

from engage.cli_support import HomeOption, console, err_console, fail, home_and_config
from engage.config import ConfigError
from training.base import MODEL_NAMES, MissingExposures, TrainingError

models_app = typer.Typer(help="List, compare and promote registered model versions.", no_args_is_help=True)
_MODULES = {"churn": "training.churn", "nbo": "training.next_best_offer", "send-time": "training.send_time"}
# Headline metrics per registered model, in the order a person reads them.
HEADLINE = {
    "churn": ["roc_auc", "brier", "pr_auc", "lift_top_decile", "auc_ratio_to_oracle"],
    "next_best_offer": ["dr_policy_value", "dr_logging_value", "true_profit_ratio_to_oracle"],
    "send_time": ["holdout_open_rate_at_chosen_hour", "true_open_ratio_to_oracle", "best_hour_hit_rate"],
}


def train_command(
    model: Annotated[str, typer.Argument(help="churn, nbo, send-time or all.")] = "all",
    as_of: Annotated[str | None, typer.Option("--as-of", help="Data cutoff (ISO 8601): nothing at or after it "
                                              "is used. Default: just after the last loaded event.")] = None,
    horizon_days: Annotated[int | None, typer.Option("--horizon-days", help="Churn horizon in days "
                                                     "(default from config: 90).")] = None,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment name.")] = "engage",
    home: HomeOption = None,
) -> None:
    """Build training sets from Feast, train, evaluate on a time-based holdout, log, register and gate."""
    from training.context import open_context
    from training.registry import log_and_register

    if model not in (*_MODULES, "all"):
        fail(f"unknown model '{model}': use one of churn, nbo, send-time, all")
    wanted = list(_MODULES) if model == "all" else [model]
    done = 0
    try:
        home_dir, cfg = home_and_config(home)
        with open_context(home_dir, cfg, as_of, horizon_days) as ctx:
            for i, name in enumerate(wanted, 1):
                with console.status(f"[{i}/{len(wanted)}] training {name} (snapshots, Feast, fit, evaluate) ..."):
                    try:
                        result = importlib.import_module(_MODULES[name]).train(ctx)
                    except MissingExposures as exc:
                        if model != "all":
                            raise
                        err_console.print(f"[yellow]skipped {name}:[/] {exc}")
                        continue
                with console.status(f"[{i}/{len(wanted)}] logging {name} to MLflow ..."):
                    reg = log_and_register(result, ctx, experiment)
                done += 1
                shown = ", ".join(f"{k} {reg.metrics[k]:.4f}" for k in HEADLINE[reg.model_name] if k in reg.metrics)
                console.print(f"[bold]{reg.model_name}[/] version {reg.version} -> [bold]{reg.alias}[/]: {reg.reason}")
                console.print(f"  holdout: {shown}")
    except (TrainingError, ConfigError, OSError) as exc:
        fail(str(exc))
    if not done:
        fail("no model was trained")


def _metric(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


@models_app.command("list")
def list_command(home: HomeOption = None) -> None:
    """Every registered version, its aliases and headline holdout metrics."""
    from training.registry import versions

    try:
        rows = versions()
    except TrainingError as exc:
        fail(str(exc))
    if not rows:
        console.print("no models registered yet: run `engage train all`")
        return
    table = Table("model", "version", "aliases", "trained as of", "headline metrics")
    for r in rows:
        head = ", ".join(f"{k}={r['metrics'][k]:.4f}" for k in HEADLINE.get(r["model"], []) if k in r["metrics"])
        table.add_row(r["model"], str(r["version"]), ",".join(r["aliases"]), r["as_of"][:10], head)
    console.print(table)


@models_app.command("compare")
def compare_command(
    model: Annotated[str | None, typer.Argument(help="churn, next_best_offer or send_time (default: all).")] = None,
    home: HomeOption = None,
) -> None:
    """Versions side by side with their holdout metrics and the difference to the champion."""
    from training.registry import versions

    names = list(MODEL_NAMES.values())
    if model is not None:
        model = MODEL_NAMES.get(model, model)
        if model not in names:
            fail(f"unknown model '{model}': use one of {', '.join(names)}")
    try:
        rows = versions(model)
    except TrainingError as exc:
        fail(str(exc))
    if not rows:
        console.print("no models registered yet: run `engage train all`")
        return
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        champ = next((r for r in mine if "champion" in r["aliases"]), None)
        cols = [k for k in HEADLINE[name] if any(k in r["metrics"] for r in mine)]
        main = cols[0] if cols else None
        table = Table("version", "aliases", "as of", *cols, f"Δ {main} vs champion", "gate decision", title=name)
        for r in mine:
            vals = [_metric(r["metrics"].get(c)) for c in cols]
            delta = (
                f"{r['metrics'][main] - champ['metrics'][main]:+.4f}"
                if champ and main in r["metrics"] and main in champ["metrics"] else ""
            )
            table.add_row(str(r["version"]), ",".join(r["aliases"]), r["as_of"][:10], *vals, delta, r["gate_reason"])
        console.print(table)


@models_app.command("promote")
def promote_command(
    model: Annotated[str, typer.Argument(help="churn, next_best_offer or send_time.")],
    version: Annotated[int, typer.Argument(help="The version to make champion.", min=1)],
    home: HomeOption = None,
) -> None:
    """Manually move the `champion` alias to a version (the previous champion becomes `challenger`)."""
    from training.registry import promote

    name = MODEL_NAMES.get(model, model)
    if name not in MODEL_NAMES.values():
        fail(f"unknown model '{model}': use one of {', '.join(MODEL_NAMES.values())}")
    try:
        previous = promote(name, str(version))
    except TrainingError as exc:
        fail(str(exc))
    console.print(f"{name} version {version} is now champion" + (f" (was version {previous})" if previous else ""))
