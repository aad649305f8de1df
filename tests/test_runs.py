"""End-to-end runs: CLI, checkpoints and resume, tuning, history masking, the answer-leak check."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from recbole_mm.config import Config
from recbole_mm.quick_start import load_data_and_model, run_recbole_mm
from recbole_mm.utils import create_dataset, data_preparation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_recbole_mm.py"), *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("model", ["LRURec", "SASRec"])
def test_cli_runs_one_epoch(tiny_dataset, model, tmp_path):
    data_path, name = tiny_dataset
    out = tmp_path / f"{model}.json"
    proc = _cli(f"--model={model}", f"--dataset={name}", f"--data_path={data_path}", "--epochs=1",
                "--hidden_size=16", "--inner_size=32", "--show_progress=False", f"--result_file={out}",
                "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["epochs_run"] == 1 and result["time_per_epoch_s"] > 0 and result["peak_rss_mb"] > 0
    for metric in ("ndcg@10", "recall@10", "mrr@10", "ndcg@5", "recall@5"):
        assert 0.0 <= result["test_result"][metric] <= 1.0


def test_cli_errors_are_one_clear_line(tiny_dataset):
    data_path, name = tiny_dataset
    proc = _cli("--model=NoSuchModel", f"--dataset={name}", f"--data_path={data_path}")
    assert proc.returncode == 2 and "Unknown model 'NoSuchModel'" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("--model=LRURec", "--dataset=nowhere", f"--data_path={data_path}")
    assert proc.returncode == 2 and "recbole-mm-data convert-amazon --name nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_is_weights_only_and_resume_continues(tiny_dataset):
    data_path, name = tiny_dataset
    cfg = tiny_config(data_path, epochs=2)
    first = run_recbole_mm("LRURec", name, config_dict=cfg)
    ckpt = first["saved_model_file"]
    state = torch.load(ckpt, weights_only=True)  # must not need unsafe unpickling
    assert state["config"]["model"] == "LRURec" and "optimizer" in state
    assert not [f for f in os.listdir(os.path.dirname(ckpt)) if f.endswith(".part")]  # no half-written files

    resumed = run_recbole_mm("LRURec", name, config_dict={**cfg, "epochs": 4}, resume=ckpt)
    assert resumed["epochs_run"] == 4 - (state["epoch"] + 1)

    config, model, _, _, _, test_data = load_data_and_model(ckpt)
    reloaded = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reloaded[key])


def test_resume_refuses_unsafe_checkpoint(tiny_dataset, tmp_path):
    data_path, name = tiny_dataset
    bad = tmp_path / "recbole_style.pth"
    torch.save({"config": Config("LRURec", name, config_dict={"data_path": data_path})}, bad)
    with pytest.raises(RuntimeError, match="weights_only"):
        run_recbole_mm("LRURec", name, config_dict=tiny_config(data_path), resume=str(bad))


def test_hyper_tuning_two_trials(tiny_dataset, tmp_path):
    from recbole_mm.hyper import main

    data_path, name = tiny_dataset
    params = tmp_path / "p.hyper"
    params.write_text("dropout_prob choice [0.1,0.3]\n")
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in tiny_config(data_path).items()))
    out = tmp_path / "hyper.result"
    assert main(["--model=LRURec", f"--dataset={name}", f"--params_file={params}", f"--config_files={fixed}",
                 f"--output_file={out}"]) == 0
    text = out.read_text()
    assert text.count("dropout_prob:0.1") == 1 and text.count("dropout_prob:0.3") == 1


def _user_sequences(data_path, name):
    seqs = {}
    with open(os.path.join(data_path, name, f"{name}.inter"), encoding="utf-8") as f:
        next(f)
        for line in f:
            user, item, _ = line.rstrip("\n").split("\t")
            seqs.setdefault(user, []).append(item)
    return seqs


@pytest.mark.parametrize("mask_history", [False, True])
def test_mask_history_excludes_exactly_the_earlier_items(tiny_dataset, mask_history):
    data_path, name = tiny_dataset
    config = Config("SASRec", name, config_dict=tiny_config(data_path, mask_history=mask_history))
    dataset = create_dataset(config)
    _, valid_data, test_data = data_preparation(config, dataset)
    seqs = _user_sequences(data_path, name)
    users, items = dataset.field2id_token["user_id"], dataset.field2id_token["item_id"]
    for loader, cut in ((valid_data, 2), (test_data, 1)):
        for interaction, history_index, _, _ in loader:
            if not mask_history:
                assert history_index is None
                continue
            rows, cols = history_index
            for r, uid in enumerate(interaction["user_id"].tolist()):
                got = {items[i] for i in cols[rows == r].tolist()}
                assert got == set(seqs[users[uid]][:-cut])


def test_masked_items_never_ranked(tiny_dataset):
    from recbole_mm.utils import get_model, get_trainer

    data_path, name = tiny_dataset
    config = Config("LRURec", name, config_dict=tiny_config(data_path, mask_history=True))
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    model = get_model("LRURec")(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "LRURec")(config, model)
    trainer.tot_item_num = test_data._dataset.item_num  # set by trainer.evaluate() in a real run
    batch = next(iter(test_data))
    _, scores, _, _ = trainer._full_sort_batch_eval(batch)
    rows, cols = batch[1]
    assert torch.isinf(scores[rows, cols]).all() and (scores[rows, cols] < 0).all()
    assert torch.isfinite(scores[:, 1:]).sum() == scores[:, 1:].numel() - len(set(zip(rows.tolist(), cols.tolist())))


def test_answer_and_its_item_features_never_reach_full_sort_predict(tiny_dataset):
    from recbole.data.dataloader import FullSortEvalDataLoader

    data_path, name = tiny_dataset
    load = {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "brand", "price"]}
    config = Config("SASRec", name, config_dict=tiny_config(data_path, load_col=load))
    dataset = create_dataset(config)
    _, valid_data, test_data = data_preparation(config, dataset)
    # RecBole's own loader joins the answer's id and features into the batch ...
    plain = FullSortEvalDataLoader(config, test_data._dataset, test_data._sampler)
    assert {"item_id", "brand", "price"} <= set(next(iter(plain))[0].columns)
    # ... ours does not, while the evaluator still gets the answer
    for loader in (valid_data, test_data):
        interaction, _, positive_u, positive_i = next(iter(loader))
        assert not {"item_id", "brand", "price"} & set(interaction.columns)
        assert "item_id_list" in interaction.columns and len(positive_i) == len(interaction)
        assert (positive_i > 0).all()
