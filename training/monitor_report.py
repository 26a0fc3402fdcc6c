"""What `engage monitor` leaves behind: a printed table, an HTML report with charts, a JSON file, an MLflow run.

Files go to ``$ENGAGE_HOME/monitor/`` (``monitor_<as-of>.html`` and ``.json``; ``--out`` moves the HTML and its
JSON elsewhere) and ``latest.json`` there is always the last run's JSON: the scoring service exports it as
Prometheus gauges (``serving/metrics.py``). Everything is written to temporary files first and logged to MLflow
(experiment ``engage-monitor``); only then are the files renamed into place, so a failed run leaves no report
that looks complete.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.table import Table  # noqa: E402

from training.monitor_checks import ModelDrift, MonitorResult  # noqa: E402
from training.plots import save_figure  # noqa: E402

EXPERIMENT = "engage-monitor"
LATEST = "latest.json"
TOP_FEATURES = 25


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    json: Path
    latest: Path
    run_id: str


def monitor_dir(home: Path) -> Path:
    return home / "monitor"


def check_out(out: Path | None) -> None:
    """Refuse an --out that is not an .html file in a folder that can be written (before any work is done)."""
    if out is None:
        return
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out {out}: use an .html file (the JSON is written beside it)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder")
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: cannot write in {folder}")


def alert_table(result: MonitorResult) -> Table:
    table = Table("level", "model", "check", "subject", "value", "threshold", "what", title=f"monitor as of "
                  f"{result.as_of:%Y-%m-%d %H:%M}Z: {len(result.fired)} alert(s)")
    for a in sorted(result.alerts, key=lambda a: (a.level != "alert", a.model, -abs(a.value))):
        style = "bold red" if a.level == "alert" else "yellow"
        table.add_row(f"[{style}]{a.level}[/]", a.model, a.check, a.subject, f"{a.value:.3f}", f"{a.threshold:g}",
                      a.message)
    return table


def model_table(result: MonitorResult) -> Table:
    table = Table("model", "version", "reference", "max feature PSI", "scores (PSI, mean now / training)")
    for m in result.models:
        scores = "; ".join(f"{s['score']} {s['psi']:.3f}, {s['current_mean']:.3f} / {s['reference_mean']:.3f}"
                           for s in m.scores)
        table.add_row(m.name, m.version, m.reference, f"{m.max_feature_psi:.3f}", scores)
    return table


# -- charts ------------------------------------------------------------------------------------------------


def psi_chart(m: ModelDrift, warn: float, alert: float, path: Path) -> Path:
    """The features of highest PSI (those the config ignores are in the table only: they would set the scale)."""
    rows = [f for f in m.features if np.isfinite(f["psi"]) and not f["ignored"]][:TOP_FEATURES][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    colors = ["#d62728" if f["psi"] > alert else ("#ff7f0e" if f["psi"] > warn else "#1f77b4") for f in rows]
    ax.barh([f["feature"] for f in rows], [f["psi"] for f in rows], color=colors)
    for x, style in ((warn, ":"), (alert, "--")):
        ax.axvline(x, color="grey", ls=style, lw=0.8)
    ax.set(xlabel="population stability index vs training data", title=f"{m.name} v{m.version}: feature drift")
    return save_figure(fig, path)


def _bin_labels(edges: list[float]) -> list[str]:
    if not edges:
        return ["all", "missing"]
    labels = [f"≤{edges[0]:.3g}"] + [f"{a:.3g}-{b:.3g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return [*labels, f">{edges[-1]:.3g}", "missing"]


def score_chart(m: ModelDrift, path: Path) -> Path:
    fig, axes = plt.subplots(len(m.scores), 1, figsize=(8, 2.6 * len(m.scores)), squeeze=False)
    for ax, s in zip(axes[:, 0], m.scores, strict=True):
        labels, x = _bin_labels(s["edges"]), np.arange(len(s["reference_shares"]))
        ax.bar(x - 0.2, s["reference_shares"], 0.4, label="training data")
        ax.bar(x + 0.2, s["current_shares"], 0.4, label="now")
        ax.set_xticks(x, labels[: len(x)], rotation=30, fontsize=7)
        ax.set(ylabel="share of customers", title=f"{s['score']} (PSI {s['psi']:.3f})")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def calibration_chart(cal: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.6))
    pred, obs = [d["predicted"] for d in cal["deciles"]], [d["observed"] for d in cal["deciles"]]
    ax.plot(pred, obs, marker="o", label=f"deciles (Brier {cal['brier']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="predicted churn probability", ylabel="observed churn rate",
           title=f"Churn predicted at {cal['at'][:10]}, {cal['horizon_days']} days later")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def churn_rate_chart(cr: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    days = [d[:10] for d in cr["days"]]
    ref, band = cr["reference"], cr["threshold_points"] / 100
    ax.axhspan(ref - band, ref + band, color="#dddddd", label=f"training data ± {cr['threshold_points']:g} points")
    ax.axhline(ref, color="grey", lw=0.8)
    ax.plot(days, cr["means"], marker="o", label="daily mean churn score")
    ax.set(ylabel="mean churn probability", title="Daily mean churn score")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def charts(result: MonitorResult, folder: Path, warn: float, alert: float) -> dict[str, Path]:
    out = {}
    for m in result.models:
        out[f"{m.name} feature drift"] = psi_chart(m, warn, alert, folder / f"{m.name}_feature_psi.png")
        if m.scores:
            out[f"{m.name} scores"] = score_chart(m, folder / f"{m.name}_scores.png")
    if result.churn_rate:
        out["daily churn score"] = churn_rate_chart(result.churn_rate, folder / "churn_daily.png")
    if result.calibration:
        out["churn calibration"] = calibration_chart(result.calibration, folder / "churn_calibration.png")
    return out


# -- HTML --------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(result: MonitorResult, images: dict[str, Path]) -> str:
    status = f"{len(result.fired)} alert(s)" if result.fired else "quiet: no alert"
    parts = [f"<h1>Engage drift monitor, as of {result.as_of:%Y-%m-%d %H:%M} UTC</h1>",
             f"<p class='{'bad' if result.fired else 'ok'}'>{html.escape(status)}; {result.customers:,} customers "
             "in the current snapshot</p>"]
    if result.alerts:
        parts.append(_table(["level", "model", "check", "subject", "value", "threshold", "what"],
                            [[a.level, a.model, a.check, a.subject, f"{a.value:.3f}", f"{a.threshold:g}", a.message]
                             for a in result.alerts]))
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in result.notes]
    for m in result.models:
        parts.append(f"<h2>{m.name} version {m.version}</h2><p>trained as of {m.trained_as_of[:10]}; reference: "
                     f"{html.escape(m.reference)} ({m.reference_rows:,} rows); run {m.run_id}</p>")
        parts.append(_table(["score", "PSI", "mean now", "mean in training data"],
                            [[s["score"], f"{s['psi']:.3f}", f"{s['current_mean']:.4f}", f"{s['reference_mean']:.4f}"]
                             for s in m.scores]))
        parts.append(_table(["feature", "PSI", "missing now", "missing in training data", ""],
                            [[f["feature"], f"{f['psi']:.3f}", f"{f['missing_current']:.1%}",
                              f"{f['missing_reference']:.1%}", "ignored" if f["ignored"] else ""]
                             for f in m.features[:TOP_FEATURES]]))
    cal = result.calibration
    if cal:
        parts.append(f"<h2>Churn calibration</h2><p>{cal['customers']:,} customers at {cal['at'][:10]}: predicted "
                     f"{cal['predicted_mean']:.1%}, observed {cal['observed_rate']:.1%}, Brier {cal['brier']:.4f}</p>")
    for title, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(title)}</h3>"
                     f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}.bad{color:#b00;font-weight:bold}"
             ".ok{color:#070;font-weight:bold}.note{color:#555}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Engage monitor {result.as_of:%Y-%m-%d}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


# -- files and MLflow ----------------------------------------------------------------------------------------


def _log_run(result: MonitorResult, payload: dict, files: list[Path]) -> str:
    import mlflow

    from training.registry import artifact_root, connect

    client = connect()
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        EXPERIMENT, artifact_location=Path(artifact_root()).resolve().as_uri())
    metrics = {"alerts": float(len(result.fired)), "customers": float(result.customers)}
    for m in result.models:
        metrics[f"max_feature_psi/{m.name}"] = m.max_feature_psi
        metrics |= {f"psi/{m.name}/{s['score']}": s["psi"] for s in m.scores}
        metrics |= {f"feature_psi/{m.name}/{f['feature']}": f["psi"] for f in m.features}
    if result.calibration:
        metrics |= {"calibration_gap": result.calibration["gap"], "calibration_brier": result.calibration["brier"]}
    if result.churn_rate:
        metrics["churn_rate_points"] = result.churn_rate["points"][-1]
    with mlflow.start_run(experiment_id=exp_id, run_name=f"monitor as of {result.as_of:%Y-%m-%d}") as run:
        mlflow.log_params({"as_of": result.as_of.isoformat(),
                           **{f"{m.name}_version": m.version for m in result.models}})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)})
        mlflow.set_tags({"status": payload["status"], "alerts": str(len(result.fired))})
        for f in files:
            mlflow.log_artifact(str(f))
    return run.info.run_id


def write_report(result: MonitorResult, home: Path, warn: float, alert: float, out: Path | None = None) -> ReportFiles:
    """Charts, HTML, JSON and the MLflow run; the files appear only once all of it succeeded."""
    folder = monitor_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    html_path = out or folder / f"monitor_{result.as_of:%Y%m%dT%H%M%SZ}.html"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    json_path, latest = html_path.with_suffix(".json"), folder / LATEST
    payload = result.to_json() | {"run_at": datetime.now(UTC).isoformat(), "report": str(html_path),
                                  "status": "alert" if result.fired else "quiet"}
    with tempfile.TemporaryDirectory(prefix="engage-monitor-") as tmp:
        work = Path(tmp)
        images = charts(result, work, warn, alert)
        staged_html, staged_json = work / html_path.name, work / json_path.name
        staged_html.write_text(render_html(result, images), encoding="utf-8")
        staged_json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        run_id = _log_run(result, payload, [staged_html, staged_json, *images.values()])
        payload["mlflow_run_id"] = run_id
        staged_json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        for staged, final in ((staged_html, html_path), (staged_json, json_path), (staged_json, latest)):
            _place(staged, final)
    return ReportFiles(html_path, json_path, latest, run_id)


def _place(staged: Path, final: Path) -> None:
    """Copy into a hidden file beside ``final``, then rename: readers never see a partial file."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(staged.read_bytes())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
