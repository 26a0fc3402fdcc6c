"""Send-time pipeline on a small simulated world: against ground truth, shrinkage, round trip, bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engage.config import load_config
from features.catalog import HOUR_PROFILE_CHANNELS, model_columns
from features.load import ingest
from tests.factories import write_contract
from training import send_time
from training.base import MissingExposures, TrainingError
from training.context import open_context

GATE = "holdout_open_rate_at_chosen_hour"


@pytest.fixture(scope="module")
def trained(sim_home):
    """Train once; keep the send-level dataset (seen through a spy) and the sizes of the plots."""
    seen = {}
    real = send_time.exposures_dataset

    def spy(ctx, service):
        seen["df"] = real(ctx, service)
        return seen["df"]

    with pytest.MonkeyPatch.context() as mp, open_context(sim_home, load_config()) as ctx:
        mp.setattr(send_time, "exposures_dataset", spy)
        result = send_time.train(ctx)
        plots = {p.name: p.stat().st_size for p in result.plots}
    return result, seen["df"], plots


def _blank_rows(result, channels) -> pd.DataFrame:
    """Feature rows of a customer with no engagement on any channel and no known group."""
    row = result.holdout[model_columns(result.features)].iloc[[0]].copy()
    for ch in HOUR_PROFILE_CHANNELS:
        row[f"{ch}_engagements_365d"] = 0
        row[[f"{ch}_hour_{h:02d}" for h in range(24)]] = 0.0
    row[send_time.GROUP] = None
    rows = pd.concat([row] * len(channels), ignore_index=True)
    return rows.assign(channel=list(channels))


def test_chosen_hours_against_ground_truth(trained):
    m = trained[0].metrics
    assert m["truth_pairs"] > 1000
    assert m["true_open_ratio_to_oracle"] > 0.72  # about 0.80 here; a Bayes rule that knows the simulator: 0.80
    assert m["true_open_ratio_to_oracle"] > m["true_open_ratio_random_hour"] + 0.15
    assert m["true_open_ratio_to_oracle"] > m["true_open_ratio_global_hour"]  # the customer's own hour helps
    assert m["true_open_ratio_to_oracle_in_app"] > m["true_open_ratio_global_hour_in_app"]  # rich history there
    assert m["best_hour_hit_rate_within_1h"] > m["best_hour_hit_rate"] > 0.1


def test_replay_on_held_out_sends(trained):
    m = trained[0].metrics
    assert m["holdout_replay_matches"] > 100
    assert m[GATE] > m["holdout_open_rate_at_random_hour"] + 0.02
    assert m["holdout_open_rate_within_1h_of_chosen_hour"] > m["holdout_open_rate_at_random_hour"]
    assert m["holdout_roc_auc"] > 0.6


def test_customer_without_history_gets_the_global_best_hour(trained):
    model = trained[0].python_model
    out = model.predict(None, _blank_rows(trained[0], model.channels))
    for i, ch in enumerate(model.channels):
        assert out.loc[i, "best_local_hour"] == out.loc[i, "global_best_hour"] == model.global_best_hour(ch)
        assert out.loc[i, "uplift_vs_global_hour"] == pytest.approx(0.0)


def test_strong_history_at_an_hour_pulls_the_choice_there(trained):
    """In-app engagement happens at the preferred hour itself; email opens come hours after the send."""
    model = trained[0].python_model
    rows = _blank_rows(trained[0], ["in_app", "in_app", "email"])
    for i, (ch, hour, n) in enumerate((("in_app", 9, 40), ("in_app", 14, 40), ("email", 23, 5))):
        rows.loc[i, [f"{ch}_engagements_365d", f"{ch}_hour_{hour:02d}"]] = [n, 1.0]
    out = model.predict(None, rows)
    assert model.global_best_hour("in_app") >= 18 and model.global_best_hour("email") <= 10
    assert abs(out.loc[0, "best_local_hour"] - 9) <= 2 and abs(out.loc[1, "best_local_hour"] - 14) <= 2
    assert 18 <= out.loc[2, "best_local_hour"] <= 22  # an evening opener gets an evening email
    assert (out["uplift_vs_global_hour"] > 0).all()


def test_predict_output_and_allowed_window(trained):
    result = trained[0]
    model = result.python_model
    out = model.predict(None, result.input_example)
    curve = out[[f"open_rate_h{h:02d}" for h in range(24)]].to_numpy()
    assert len(out) == len(result.input_example) and ((curve > 0) & (curve < 1)).all()
    assert np.allclose(curve[np.arange(len(out)), out["best_local_hour"]], out["expected_open_rate"])
    assert (out["uplift_vs_global_hour"] >= -1e-12).all()
    narrow = model.predict(None, result.input_example, params={"allowed_hours": [10, 11, 12]})
    assert narrow["best_local_hour"].isin([10, 11, 12]).all()
    X = model.prepare(result.input_example)
    channel = result.input_example["channel"].iloc[0]
    assert model.open_curve_matrix(X, channel).shape == (len(X), 24)


def test_one_customer_curves_equal_the_matrix_rows(trained, monkeypatch):
    """The scoring service's one-row calls (all channels stacked, cached kernels and priors) give the rows of a
    bulk call, whether the bulk goes stacked or a channel at a time (to the last bits a matrix product of
    another shape may round differently)."""
    from training import send_time

    model = trained[0].python_model
    X = model.prepare(trained[0].holdout.head(80))
    assert len(X) <= send_time.STACK_ROWS_MAX
    stacked = model.open_curves(X)
    monkeypatch.setattr(send_time, "STACK_ROWS_MAX", 10)
    by_channel = model.open_curves(X)
    assert set(stacked) == set(by_channel) == set(model.channels)
    for channel in model.channels:
        np.testing.assert_allclose(by_channel[channel], stacked[channel], rtol=1e-12, atol=0)
        np.testing.assert_allclose(model.open_curve_matrix(X, channel), stacked[channel], rtol=1e-12, atol=0)
    for i in range(len(X)):
        for channel, curve in model.open_curves(X[i:i + 1]).items():
            np.testing.assert_allclose(curve[0], stacked[channel][i], rtol=1e-12, atol=0)


def test_evaluate_on_unpickled_model_matches_train_metrics(trained):
    import cloudpickle

    result = trained[0]
    clone = cloudpickle.loads(cloudpickle.dumps(result.python_model))
    again = result.evaluate(clone, result.holdout)
    assert again[GATE] == pytest.approx(result.metrics[GATE])
    assert result.gate.metric == GATE and result.artifacts == {}


def test_plots_are_written(trained):
    plots = trained[2]
    assert set(plots) == {"send_time_heatmap.png", "send_time_chosen_vs_true_hour.png"}
    assert all(size > 1000 for size in plots.values())


def test_no_opens_is_a_clear_error(sim_home, trained, monkeypatch):
    monkeypatch.setattr(send_time, "exposures_dataset", lambda ctx, s: trained[1].assign(opened_24h=False))
    with open_context(sim_home, load_config()) as ctx, pytest.raises(TrainingError, match="opened within 24 h"):
        send_time.train(ctx)


def test_too_few_sends_is_an_error(sim_home, trained, monkeypatch):
    monkeypatch.setattr(send_time, "exposures_dataset", lambda ctx, s: trained[1].head(60))
    with open_context(sim_home, load_config()) as ctx, pytest.raises(TrainingError, match="too little data"):
        send_time.train(ctx)


def test_no_exposures_loaded(tmp_path):
    src, home = write_contract(tmp_path / "src", exposures=None), tmp_path / "home"
    ingest(src, home)
    with open_context(home, load_config()) as ctx, pytest.raises(MissingExposures):
        send_time.train(ctx)
