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


def test_eval_batch_bounds_the_score_matrix():
    # users per full-ranking batch x (items + 1) stays within 2^26 floats; RecBole's 4096 at small |I|
    assert scaling.eval_users_per_batch(10_000) == 4096
    assert scaling.eval_users_per_batch(1_000_000) == 67
    assert scaling.eval_users_per_batch(1_000_000) * 1_000_001 <= 2 ** 26
    assert scaling.eval_users_per_batch(10 ** 8) == 16


def test_a_point_past_the_memory_limit_is_stopped_and_recorded(tmp_path):
    import subprocess

    grow = "import time; x = bytearray(400 * 2 ** 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", grow])
    seen = scaling.watch_rss(proc, max_rss_gb=0.2, every_s=0.05)
    assert seen is not None and seen > 0.2 and proc.returncode is not None   # killed, not left sleeping
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    assert "limit" in scaling.watch_rss(slow, max_rss_gb=10, every_s=0.05, max_s=0.5) and slow.returncode is not None
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    assert scaling.watch_rss(quick, max_rss_gb=0.2) is None and quick.returncode == 0
    # a stopped point is listed in the table and left out of the fits
    fine = {"users": 10, "interactions": 50, "time_per_epoch_s": 1.0, "eval_s_per_user": 0.1, "peak_rss_mb": 100}
    results = {"loadavg": "0 0 0", "ranker_model": "small",
               "lrurec": {"items": [{**fine, "items": 10}, {**fine, "items": 100, "time_per_epoch_s": 10.0},
                                    {"users": 10, "items": 1000, "interactions": None, "stopped": "memory"}]},
               "prime": [{"n_candidates": 5, "s_per_user": 0.1}, {"n_candidates": 10, "s_per_user": 0.2}]}
    scaling.report(str(tmp_path), results, "test")
    assert results["slopes"]["items:time_per_epoch_s"] == pytest.approx(1.0)
    assert "stopped: memory" in (tmp_path / "scaling.md").read_text()


def test_the_model_sees_the_whole_catalog(tmp_path):
    # 300 users draw far fewer than 5,000 distinct items; the .item file keeps them all in the item space
    scaling.write_dataset(str(tmp_path), "cat", users=300, items=5000, seed=2)
    from recbole_mm.config import Config
    from recbole_mm.data.preparation import create_dataset

    config = Config("LRURec", "cat", config_dict={
        "data_path": str(tmp_path), "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "state": "ERROR"})
    dataset = create_dataset(config)
    assert len(set(dataset.inter_feat["item_id"].tolist())) < 2000
    assert dataset.item_num == 5000 + 1   # + padding
