"""benchmarks/scaling.py (issue 18, "how cost grows"): its smoke mode end to end, its slope fit and
synthetic data against independent references."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import scaling  # noqa: E402


def test_slope_recovers_a_known_power_law():
    xs = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    assert scaling.slope(xs, 3.0 * xs ** 1.5) == pytest.approx(1.5)
    assert scaling.slope(xs, 7.0 * xs ** -0.25) == pytest.approx(-0.25)


def test_synthetic_data_has_beauty_like_lengths(tmp_path):
    n = scaling.write_dataset(str(tmp_path), "s", users=20000, items=500, seed=1)
    import pandas as pd

    inter = pd.read_csv(tmp_path / "s" / "s.inter", sep="\t")
    lengths = inter.groupby("user_id:token").size()
    assert len(inter) == n and len(lengths) == 20000 and inter["item_id:token"].nunique() <= 500
    assert lengths.min() >= 5 and lengths.max() <= 50 and lengths.mean() == pytest.approx(8.9, abs=0.2)


def test_smoke_run_writes_table_figure_and_slopes(tmp_path):
    out = tmp_path / "out"
    assert scaling.main(["--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "scaling.json").read_text())
    assert [p["users"] for p in results["lrurec"]["both"]] == [120, 240]
    assert all(p["time_per_epoch_s"] > 0 and p["eval_s_per_user"] > 0 for p in results["lrurec"]["both"])
    assert [p["n_candidates"] for p in results["prime"]] == [2, 4]
    assert all(np.isfinite(v) for v in results["slopes"].values())
    assert (out / "scaling.png").stat().st_size > 0 and "Fitted log-log slopes" in (out / "scaling.md").read_text()
