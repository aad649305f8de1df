"""The benchmark runner: models in their own processes, one table, finished results reused."""

import csv
import json
import os

from recbole_mm.bench import main


def test_bench_writes_comparison_and_reuses_results(tiny_dataset, tmp_path, capsys):
    data_path, name = tiny_dataset
    out = str(tmp_path / "cmp")
    load_col = json.dumps({"inter": ["user_id", "item_id", "timestamp"]}).replace(" ", "")
    argv = [f"--dataset={name}", "--models=LRURec,SASRec", f"--out={out}", f"--data_path={data_path}",
            "--hidden_size=16", "--inner_size=32", f"--load_col={load_col}", "--model_args=SASRec:epochs=1 LRURec:epochs=2"]
    assert main(argv) == 0
    with open(out + ".csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["LRURec", "SASRec"]
    assert rows[0]["epochs_run"] == "2" and rows[1]["epochs_run"] == "1"
    assert float(rows[0]["epoch_time_vs_first"]) == 1.0 and float(rows[1]["time_per_epoch_s"]) > 0
    assert "--epochs=1" in rows[1]["overrides"]
    table = open(out + ".md", encoding="utf-8").read()
    assert "| LRURec |" in table and "| SASRec |" in table and "Command: `recbole-mm-bench" in table
    stamp = os.path.getmtime(os.path.join(out + "_runs", "SASRec.json"))
    capsys.readouterr()
    assert main(argv) == 0
    assert "SASRec: reusing" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out + "_runs", "SASRec.json")) == stamp
