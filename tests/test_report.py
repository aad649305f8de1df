"""recbole-mm-report: figures and a markdown page from stored runs (rendered for real, with matplotlib)."""

import json

import pytest
from PIL import Image

from recbole_mm.report import curve_from_log, load, main, summary_rows


def _run(model, seed, ndcg10, per_epoch, scores):
    return {"model": model, "dataset": "beauty", "seed": seed, "epoch_base": 1,
            "test_result": {"ndcg@5": ndcg10 * 0.8, "ndcg@10": ndcg10, "ndcg@20": ndcg10 * 1.2,
                            "recall@5": ndcg10 * 1.5, "recall@10": ndcg10 * 2, "recall@20": ndcg10 * 3,
                            "mrr@10": ndcg10 * 0.7},
            "time_per_epoch_s": per_epoch, "total_time_s": per_epoch * len(scores), "peak_rss_mb": 900.0,
            "epoch_log": [{"epoch": e + 1, "valid_score": s} for e, s in enumerate(scores)]}


def _png(path):
    with Image.open(path) as im:
        im.verify()
        return im.size


def test_bench_table_report_renders_every_figure(tmp_path):
    prefix = tmp_path / "results" / "cmp"
    runs = prefix.parent / "cmp_runs"
    runs.mkdir(parents=True)
    names = {"LRURec": [], "SASRec": []}
    for model, base, secs in (("LRURec", 0.04, 2.0), ("SASRec", 0.02, 9.0)):
        for k, seed in enumerate((2020, 2021)):
            name = f"{model}-seed{seed}"
            (runs / f"{name}.json").write_text(json.dumps(_run(model, seed, base + 0.002 * k, secs + k, [0.01, 0.02, 0.025])))
            names[model].append(name)
    (prefix.parent / "cmp.runs.json").write_text(json.dumps({"dataset": "beauty", "command": "x", "runs": names}))
    assert main([str(prefix)]) == 0
    folder = prefix.parent / "figures" / "cmp"
    for fig in ("metrics.png", "curves.png", "cost.png", "topk.png", "efficiency.png"):
        width, height = _png(folder / fig)
        assert width > 300 and height > 200
    page = (folder / "README.md").read_text()
    assert "![" in page and "(efficiency.png)" in page
    # the table's numbers: mean ± sample std over the two seeds
    assert "| LRURec | 2 | 0.0410 ± 0.0014 |" in page
    rows = summary_rows(load(prefix)["groups"])
    assert rows[1]["ndcg@10"] == pytest.approx((0.021, 0.0014142), rel=1e-4)


def test_prime_result_report_shows_stages(tmp_path):
    result = {"model": "PRIME", "dataset": "ml-100k-posters", "test_result": {"ndcg@5": 0.1, "ndcg@10": 0.12},
              "retriever_test_result": {"ndcg@5": 0.09, "ndcg@10": 0.11},
              "stages": {"retriever": {"wall_s": 60.0, "peak_rss_mb": 700.0, "reused": True},
                         "ranker": {"wall_s": 120.0, "peak_rss_mb": 900.0},
                         "preference": {"wall_s": 30.0, "peak_rss_mb": 950.0},
                         "evaluate_test": {"wall_s": 40.0, "peak_rss_mb": 980.0}},
              "curves": {"retriever": [{"epoch": 1, "valid_score": 0.05}, {"epoch": 2, "valid_score": 0.07}],
                         "ranker": [{"step": 0, "valid_ndcg@10": 0.1}, {"step": 4, "valid_ndcg@10": 0.2}],
                         "preference": [{"step": 0, "score": 0.11, "ndcg@10": 0.11}, {"step": 2, "score": 0.12, "ndcg@10": 0.12}]}}
    path = tmp_path / "prime_run.json"
    path.write_text(json.dumps(result))
    out = tmp_path / "rep"
    assert main([str(path), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {"metrics.png", "curves.png", "cost.png", "topk.png"}
    page = (out / "README.md").read_text()
    assert "| ranker | 120.0 | 900 |" in page and "| retriever (reused) | 60.0 | 700 |" in page and "per stage" in page
    assert "| retriever alone | 1 | 0.1100 |" in page and "| PRIME | 1 | 0.1200 |" in page


def test_curves_parsed_from_recbole_logs_and_missing_input_is_one_line(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("INFO  epoch 0 training [time: 1.50s, train loss: 3.0]\n"
                   "INFO  epoch 0 evaluating [time: 0.20s, valid_score: 0.013800]\n"
                   "INFO  epoch 1 training [time: 1.40s, train loss: 2.0]\n"
                   "INFO  epoch 1 evaluating [time: 0.20s, valid_score: 0.022700]\n")
    assert curve_from_log(log) == [{"epoch": 1, "train_s": 1.5, "valid_score": 0.0138},
                                   {"epoch": 2, "train_s": 1.4, "valid_score": 0.0227}]
    with pytest.raises(SystemExit, match="nothing found for .*nothing"):
        main([str(tmp_path / "nothing")])
