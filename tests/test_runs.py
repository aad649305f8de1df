"""End-to-end runs: CLI, checkpoints and resume, tuning, history masking, the answer-leak check."""

import json
import os
import subprocess
import sys

import pytest
import torch
from recbole.data.dataloader import FullSortEvalDataLoader

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


def _user_sequences(data_path, name, with_time=False):
    seqs = {}
    with open(os.path.join(data_path, name, f"{name}.inter"), encoding="utf-8") as f:
        next(f)
        for line in f:
            user, item, ts = line.rstrip("\n").split("\t")
            seqs.setdefault(user, []).append((item, float(ts)) if with_time else item)
    return seqs


@pytest.mark.parametrize("mask_history", [False, True])
def test_mask_history_excludes_exactly_the_earlier_items(tiny_dataset, mask_history):
    data_path, name = tiny_dataset
    config = Config("SASRec", name, config_dict=tiny_config(data_path, mask_history=mask_history))
    dataset = create_dataset(config)
    _, valid_data, test_data = data_preparation(config, dataset)
    seqs = _user_sequences(data_path, name)
    users, items = dataset.field2id_token["user_id"], dataset.field2id_token["item_id"]
    repeats = 0
    for loader, cut in ((valid_data, 2), (test_data, 1)):
        for interaction, history_index, _, positive_i in loader:
            if not mask_history:
                assert history_index is None
                continue
            rows, cols = history_index
            for r, uid in enumerate(interaction["user_id"].tolist()):
                seq = seqs[users[uid]]
                answer = seq[-cut]
                got = {items[i] for i in cols[rows == r].tolist()}
                assert items[int(positive_i[r])] == answer
                # earlier items minus the answer: a repeated purchase stays rankable
                assert got == set(seq[:-cut]) - {answer}
                repeats += answer in seq[:-cut]
    assert not mask_history or repeats > 0  # the fixture has answers that repeat an earlier item


def test_training_prefix_history_is_exactly_the_items_before_each_target(tiny_dataset):
    from recbole_mm.data.dataloader import PrefixHistory

    data_path, name = tiny_dataset
    config = Config("SASRec", name, config_dict=tiny_config(data_path, mask_history=True))
    dataset = create_dataset(config)
    train, _, _ = dataset.build()
    history = PrefixHistory(train, config)
    seqs = _user_sequences(data_path, name, with_time=True)
    users, items = dataset.field2id_token["user_id"], dataset.field2id_token["item_id"]
    feat = train.inter_feat
    rows, got = history.index(feat["user_id"], torch.as_tensor(history.positions))
    truncated = 0
    for j, (uid, ts) in enumerate(zip(feat["user_id"].tolist(), feat["timestamp"].tolist())):
        seq = seqs[users[uid]]
        pos = [t for _, t in seq].index(ts)
        assert history.positions[j] == pos and items[int(feat["item_id"][j])] == seq[pos][0]
        assert [items[i] for i in got[rows == j].tolist()] == [i for i, _ in seq[:pos]]
        truncated += pos > config["MAX_ITEM_LIST_LENGTH"]
    assert truncated > 0  # prefixes longer than the input window are covered too


def _repeat_dataset(root, name="rep", n_users=24, n_items=30, seed=3):
    """Every user: six distinct items, then the first of them again (the test answer repeats)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        seq = list(rng.choice(np.arange(1, n_items + 1), 6, replace=False))
        seq.append(seq[0])
        lines += [f"u{u}\ti{item}\t{1000 * u + t}" for t, item in enumerate(seq)]
    folder = os.path.join(root, name)
    os.makedirs(folder)
    with open(os.path.join(folder, f"{name}.inter"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(root), name


@pytest.mark.parametrize("mask_history", [False, True])
def test_repeated_answer_is_rankable_and_hit_with_mask_history(tmp_path, mask_history):
    from recbole_mm.utils import get_model, get_trainer

    data_path, name = _repeat_dataset(tmp_path / "data")
    config = Config("SASRec", name, config_dict=tiny_config(data_path, mask_history=mask_history,
                                                            metrics=["Hit", "NDCG"], topk=[1], valid_metric="NDCG@1"))
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    model = get_model("SASRec")(config, train_data._dataset)

    def repeat_first_item(interaction):  # scores the user's first item (= the test answer) highest
        seq = interaction["item_id_list"]
        scores = torch.zeros(len(seq), dataset.item_num)
        scores[torch.arange(len(seq)), seq[:, 0]] = 1.0
        return scores

    model.full_sort_predict = repeat_first_item
    trainer = get_trainer(config["MODEL_TYPE"], "SASRec")(config, model)
    result = trainer.evaluate(test_data, load_best_model=False)
    assert result["hit@1"] == 1.0 and result["ndcg@1"] == 1.0


def test_eval_batches_carry_only_the_users_input(tiny_dataset):
    data_path, name = tiny_dataset
    config = Config("SASRec", name, config_dict=tiny_config(
        data_path, load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "brand", "price"]},
        mask_history=True))
    dataset = create_dataset(config)
    _, valid_data, test_data = data_preparation(config, dataset)
    for loader in (valid_data, test_data):
        raw = FullSortEvalDataLoader.collate_fn(loader, list(range(4)))[0]
        assert {"timestamp", "item_id", "brand", "price"} <= set(raw.columns)  # what RecBole's loader passes on
        interaction, _, _, _ = next(iter(loader))
        assert set(interaction.columns) == {"user_id", "item_id_list", "timestamp_list", "item_length"}


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


@pytest.mark.parametrize("model, metrics", [
    ("BPR", {"recall@10", "ndcg@10", "mrr@10"}),       # general, with a negative sampler
    ("GRU4Rec", {"recall@10", "ndcg@10", "mrr@10"}),   # sequential
    ("FM", {"auc", "logloss"}),                        # context-aware: RecBole's labeled protocol kept
])
def test_recbole_models_of_each_kind_run_through_the_runner(model, metrics):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: more threads only contend on a shared machine
    try:
        result = _run_on_ml100k(model)
    finally:
        torch.set_num_threads(threads)
    assert result["epochs_run"] == 1
    for key in ("best_valid_result", "test_result"):
        assert set(result[key]) >= metrics
        assert all(0.0 <= result[key][m] <= 1.0 or m == "logloss" for m in metrics)
    assert os.path.isfile(result["saved_model_file"])


def _run_on_ml100k(model):
    return run_recbole_mm(model, "ml-100k", config_dict={
        "epochs": 1, "embedding_size": 16, "hidden_size": 16, "train_batch_size": 4096, "eval_batch_size": 4096,
        "MAX_ITEM_LIST_LENGTH": 5,  # GRU4Rec's recurrence over 50 steps x 97k prefixes is minutes on a CPU
        "show_progress": False, "state": "ERROR", "checkpoint_dir": "saved"})


def test_checkpoint_names_are_unique_per_run_within_one_second(tiny_dataset, monkeypatch):
    from recbole_mm.trainer import mixin as features
    from recbole_mm.utils import get_model, get_trainer

    monkeypatch.setattr(features, "get_local_time", lambda: "Dec-03-2026_07-00-00")  # the same second
    data_path, name = tiny_dataset
    config = Config("LRURec", name, config_dict=tiny_config(data_path))
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    trainer_cls = get_trainer(config["MODEL_TYPE"], "LRURec")
    names = {os.path.basename(trainer_cls(config, get_model("LRURec")(config, train_data._dataset)).saved_model_file)
             for _ in range(2)}
    assert len(names) == 2
    for n in names:
        assert n.startswith(f"LRURec-Dec-03-2026_07-00-00-{os.getpid()}-") and n.endswith(".pth")
        assert len(n.rsplit("-", 1)[1]) == len("0123abcd.pth")
