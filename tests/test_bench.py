"""The benchmark runner: models in their own processes, one table, finished results reused,
repeated seeds with mean +- std and a paired significance test, tables rebuilt from stored runs."""

import csv
import json
import os

import numpy as np
import pytest

from recbole_mm.bench import main, parse_seeds, wilcoxon_p, write_tables


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_bench_seeds_significance_streaming_and_regenerate(tiny_dataset, tmp_path, capsys):
    data_path, name = tiny_dataset
    out = str(tmp_path / "cmp")
    load_col = json.dumps({"inter": ["user_id", "item_id", "timestamp"]}).replace(" ", "")
    argv = [f"--dataset={name}", "--models=LRURec,SASRec", f"--out={out}", f"--data_path={data_path}",
            "--hidden_size=16", "--inner_size=32", f"--load_col={load_col}", "--seeds=2",
            "--model_args=SASRec:epochs=1 LRURec:epochs=2"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert "test result" in streamed  # each run's log is streamed as it runs
    rows = _rows(out + ".csv")
    assert [r["model"] for r in rows] == ["LRURec", "SASRec"]
    assert rows[0]["seeds"] == "2020 2021" and rows[0]["n_seeds"] == "2"
    assert rows[0]["epochs_run"] == "2" and rows[1]["epochs_run"] == "1"
    assert 1 <= float(rows[0]["best_epoch"]) <= 2 and float(rows[1]["best_epoch"]) == 1.0  # 1-based
    assert float(rows[0]["epoch_time_vs_first"]) == 1.0 and float(rows[1]["time_per_epoch_s"]) > 0
    assert "--epochs=1" in rows[1]["overrides"] and "--seed=" not in rows[1]["overrides"]

    # mean and std over the seeds, and the p-value, from the stored runs (independent recomputation)
    runs = {m: [json.load(open(os.path.join(out + "_runs", f"{m}-seed{s}.json"))) for s in (2020, 2021)]
            for m in ("LRURec", "SASRec")}
    assert [r["seed"] for r in runs["LRURec"]] == [2020, 2021]
    values = [r["test_result"]["ndcg@10"] for r in runs["SASRec"]]
    assert float(rows[1]["ndcg@10"]) == pytest.approx(np.mean(values))
    assert float(rows[1]["ndcg@10_std"]) == pytest.approx(np.std(values, ddof=1))
    for r in runs["LRURec"] + runs["SASRec"]:
        per_user = r["test_per_user"]["ndcg@10"]
        assert len(per_user) == 50  # one value per test user
        assert np.mean(per_user) == pytest.approx(r["test_result"]["ndcg@10"], abs=1e-4)  # = RecBole's metric
    a = np.mean([r["test_per_user"]["ndcg@10"] for r in runs["SASRec"]], axis=0)
    b = np.mean([r["test_per_user"]["ndcg@10"] for r in runs["LRURec"]], axis=0)
    from scipy.stats import wilcoxon

    expected = 1.0 if np.all(a == b) else wilcoxon(a, b).pvalue
    assert rows[0]["p_ndcg@10_vs_first"] == "" and float(rows[1]["p_ndcg@10_vs_first"]) == pytest.approx(expected)
    table = open(out + ".md", encoding="utf-8").read()
    assert "| LRURec |" in table and " ± " in table and "Wilcoxon signed-rank" in table
    assert "no published numbers exist for this dataset" in table and "PRIME Table 2" not in table

    # stored runs are reused; --regenerate rebuilds the same tables without running anything
    stamp = os.path.getmtime(os.path.join(out + "_runs", "SASRec-seed2021.json"))
    assert main(argv) == 0
    assert "SASRec-seed2021: reusing" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out + "_runs", "SASRec-seed2021.json")) == stamp
    os.remove(out + ".md")
    assert main([f"--out={out}", "--regenerate"]) == 0
    assert open(out + ".md", encoding="utf-8").read() == table


def test_single_run_tables_keep_their_names_and_old_zero_based_best_epochs(tmp_path):
    out = str(tmp_path / "old")
    os.makedirs(out + "_runs")
    old = {"model": "LRURec", "dataset": "beauty", "test_result": {"ndcg@10": 0.04}, "epochs_run": 1,
           "best_epoch": 0, "bench_args": ["--epochs=1"]}  # stored before best epochs were 1-based
    json.dump(old, open(os.path.join(out + "_runs", "LRURec.json"), "w"))
    assert main([f"--out={out}", "--regenerate", "--models=LRURec"]) == 0
    table = open(out + ".md", encoding="utf-8").read()
    assert "| 1 (1) |" in table and "0.0400 (0.0438)" in table and "PRIME Table 2 (Amazon Beauty" in table


def test_seed_parsing_and_wilcoxon_reference():
    assert parse_seeds("3") == [2020, 2021, 2022] and parse_seeds("1,7,42") == [1, 7, 42]
    with pytest.raises(SystemExit, match="--seeds"):
        parse_seeds("1,1")
    # reference: scipy's exact test; 10 users all better by distinct amounts -> p = 2 / 2**10
    a = [0.1 * k for k in range(1, 11)]
    assert wilcoxon_p([x + 1 for x in a], [x + 1 - d for x, d in zip(a, a)]) == pytest.approx(2 / 1024)
    assert wilcoxon_p([0.5, 0.2], [0.5, 0.2]) == 1.0 and wilcoxon_p([], []) is None


def test_write_tables_accepts_one_result_per_model(tmp_path):
    r = {"model": "SASRec", "test_result": {"ndcg@10": 0.1}, "epochs_run": 3, "best_epoch": 2, "epoch_base": 1}
    rows = write_tables([r], "ml-100k", str(tmp_path / "t"), "cmd")
    assert rows[0]["best_epoch"] == 2 and rows[0]["ndcg@10_std"] is None
