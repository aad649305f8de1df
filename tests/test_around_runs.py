"""Around every run: dataset names and how to get them, fail-fast preflight, unknown config keys,
caches outside installed packages."""

import gzip
import json
import os
import warnings

import pytest

from conftest import tiny_config
from recbole_mm.config import Config
from recbole_mm.config_keys import UnknownConfigKeyWarning, unknown_key_messages
from recbole_mm.preflight import PreflightError, preflight


# ------------------------------------------------------------------------------ 1. datasets
def _write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_prepare_beauty_from_public_raw_files(tmp_path):
    from recbole_mm.data.cli import main

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [(f"u{u}", f"i{i}", 1000 + 10 * k + u) for u in range(5) for k, i in enumerate(range(5))]
    _write_gz(raw / "reviews_Beauty_5.json.gz", [json.dumps({"reviewerID": u, "asin": i, "overall": 5.0,
                                                              "unixReviewTime": t}) for u, i, t in rows])
    _write_gz(raw / "meta_Beauty.json.gz", [repr({"asin": f"i{i}", "title": f"Lipstick {i}"}) for i in range(5)])
    assert main(["prepare", "beauty", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 0
    inter = (tmp_path / "out" / "beauty" / "beauty.inter").read_text().splitlines()
    assert len(inter) == 1 + 25 and inter[0].startswith("user_id:token\titem_id:token")
    side = [json.loads(x) for x in (tmp_path / "out" / "beauty" / "beauty.items.jsonl").read_text().splitlines()]
    assert {r["item_id"]: r["title"] for r in side}["i3"] == "Lipstick 3"


def test_prepare_errors_say_where_the_files_come_from(tmp_path, capsys):
    from recbole_mm.data.cli import main

    assert main(["prepare", "beauty", "--raw", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "reviews_Beauty_5.json.gz not found" in err and "jmcauley.ucsd.edu" in err
    assert main(["prepare", "beauty", "--shared", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "shared data folder not found" in err and "--raw" in err and "meta_Beauty.json.gz" in err
    assert main(["prepare", "hm", "--raw", str(tmp_path)]) == 2
    assert "--raw is only supported for beauty" in capsys.readouterr().err


def test_missing_dataset_names_the_command_and_recbole_names_go_to_recbole(tmp_path):
    from recbole_mm.utils import check_dataset_files

    cfg = Config(model="LRURec", dataset="beauty", config_dict={"data_path": str(tmp_path)})
    with pytest.raises(FileNotFoundError) as err:
        check_dataset_files(cfg)
    assert "recbole-mm-data prepare beauty" in str(err.value) and "--raw FOLDER" in str(err.value)
    # RecBole's own names are left to RecBole, which downloads them (no download here: checked only)
    for name in ("amazon-beauty", "ml-1m"):
        check_dataset_files(Config(model="LRURec", dataset=name, config_dict={"data_path": str(tmp_path)}))
    # our prepared ML-1M no longer shadows RecBole's ml-1m
    ours = Config(model="LRURec", dataset="ml-1m-llamarec", config_dict={"data_path": str(tmp_path)})
    theirs = Config(model="LRURec", dataset="ml-1m", config_dict={"data_path": str(tmp_path)})
    assert ours["load_col"] == {"inter": ["user_id", "item_id", "timestamp"]}
    assert theirs["load_col"] != ours["load_col"]  # RecBole's defaults (rating column etc.)
    with pytest.raises(FileNotFoundError, match="recbole-mm-data prepare ml-1m-llamarec"):
        check_dataset_files(ours)


# ------------------------------------------------------------------------------ 2. fail fast
def _prime(data_path, tmp_path, **extra):
    return tiny_config(data_path, MAX_ITEM_LIST_LENGTH=10, retriever_config={"epochs": 1},
                       artifacts_dir=str(tmp_path / "artifacts"), **extra)


def test_prime_with_unreachable_ranker_fails_before_training(tiny_dataset, tmp_path, monkeypatch):
    from recbole_mm.quick_start import run_recbole_mm

    data_path, name = tiny_dataset
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PreflightError, match="ranker_model: 'nobody-xyz/no-such-model' is neither"):
        run_recbole_mm("PRIME", name, config_dict=_prime(data_path, tmp_path, ranker_model="nobody-xyz/no-such-model"))
    with pytest.raises(PreflightError, match="ranker_model: local checkpoint directory './no/such/dir' was not found"):
        run_recbole_mm("PRIME", name, config_dict=_prime(data_path, tmp_path, ranker_model="./no/such/dir"))
    # nothing was trained or half-made: no stage folder, no checkpoint
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())
    assert not os.path.isdir("saved") or not os.listdir("saved")


def test_preflight_checks_each_stage_input(tiny_dataset, tmp_path):
    data_path, name = tiny_dataset
    ok = Config(model="PRIME", dataset=name, config_dict=_prime(data_path, tmp_path, ranker_model="small"))
    assert preflight(ok) == ["dataset", "checkpoint_dir", "side file", "artifacts_dir", "ranker_model"]
    bad = Config(model="PRIME", dataset=name, config_dict=_prime(data_path, tmp_path, ranker_model="small",
                                                                 retriever_checkpoint=str(tmp_path / "x.pth")))
    with pytest.raises(PreflightError, match="retriever_checkpoint=.*x.pth does not exist"):
        preflight(bad)
    # images named by the side file but none on disk
    folder = os.path.join(data_path, name)
    images = os.path.join(folder, "images")
    moved = images + ".gone"
    os.rename(images, moved)
    try:
        with pytest.raises(PreflightError, match="download-images --dataset"):
            preflight(ok)
    finally:
        os.rename(moved, images)
    vlm = Config(model="VLM4Rec", dataset=name, config_dict=tiny_config(data_path, fusion="concat",
                                                                         text_source="title", image_encoder=None))
    with pytest.raises(PreflightError, match="fusion=concat needs image vectors: set image_encoder"):
        preflight(vlm)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root can write anywhere
            cfg = Config(model="PRIME", dataset=name, config_dict=_prime(data_path, tmp_path, ranker_model="small",
                                                                         artifacts_dir=str(locked / "a")))
            with pytest.raises(PreflightError, match="artifacts_dir=.* cannot be written"):
                preflight(cfg)
    finally:
        locked.chmod(0o700)


def test_failed_stage_leaves_no_empty_folder(tmp_path):
    from recbole_mm.trainer.stage_store import StageStore

    store = StageStore(tmp_path)
    store.folder("ranker", "abc")
    (store.folder("retriever", "def") / "retriever.pth").write_bytes(b"x")
    assert [p.name for p in store.remove_unfinished_empty()] == ["ranker-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retriever-def"]


# ------------------------------------------------------------------------------ 5. unknown keys
def test_misspelled_key_warns_with_closest_known_key(tmp_path):
    with pytest.warns(UnknownConfigKeyWarning, match=r"'epoch' \(command line\): did you mean 'epochs'"):
        cfg = Config(model="LRURec", dataset="ml-100k", argv=["--epoch=1"])
    assert cfg["epochs"] != 1  # ignored, as RecBole ignores it; the warning is what changed
    with pytest.warns(UnknownConfigKeyWarning, match=r"'learnig_rate' \(config_dict\): did you mean 'learning_rate'"):
        Config(model="LRURec", dataset="ml-100k", config_dict={"learnig_rate": 0.1})
    yaml_file = tmp_path / "my.yaml"
    yaml_file.write_text("hiden_size: 8\n")
    with pytest.warns(UnknownConfigKeyWarning, match=r"'hiden_size' \(config file .*my.yaml\): did you mean 'hidden_size'"):
        Config(model="LRURec", dataset="ml-100k", config_file_list=[str(yaml_file)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownConfigKeyWarning)
        # known keys of RecBole, of its models and of ours pass silently
        Config(model="PRIME", dataset="ml-100k", argv=["--epochs=1", "--n_layers=1", "--ranker_epochs=1",
                                                       "--log_wandb=False", "--eval_args={'order':'TO'}"])
    assert unknown_key_messages({"x": {"zzzqqq": 1}}) == ["unknown config key 'zzzqqq' (x): no known key is close to it"]


def test_strict_config_makes_unknown_keys_errors():
    with pytest.raises(ValueError, match="unknown config key 'epoch'.*did you mean 'epochs'.*strict_config"):
        Config(model="LRURec", dataset="ml-100k", argv=["--epoch=1", "--strict_config=True"])
    with pytest.raises(ValueError, match="'epoch'"):
        Config(model="LRURec", dataset="ml-100k", config_dict={"strict_config": True, "epoch": 1})


def test_cli_strict_config_error_is_one_line(tiny_dataset):
    from recbole_mm.cli import main

    data_path, name = tiny_dataset
    assert main(["--model=LRURec", f"--dataset={name}", f"--data_path={data_path}", "--epoch=1",
                 "--strict_config=True"]) == 2


# ------------------------------------------------------------------------------ 6. caches
def test_caches_default_under_working_directory_saved(tmp_path):
    import recbole

    from recbole_mm.paths import description_dir, embedding_cache_dir, inside_installed_package

    cfg = Config(model="VLM4Rec", dataset="ml-100k", config_dict={"text_source": "title"})
    assert inside_installed_package(cfg["data_path"])  # RecBole's bundled ml-100k
    assert embedding_cache_dir(cfg) == tmp_path / "saved" / "vlm4rec_cache" / "ml-100k"
    assert description_dir(cfg) == tmp_path / "saved" / "descriptions" / "ml-100k"
    inside = os.path.join(os.path.dirname(recbole.__file__), "cache")
    bad = Config(model="VLM4Rec", dataset="ml-100k", config_dict={"embedding_cache_dir": inside})
    with pytest.raises(ValueError, match="embedding_cache_dir=.* inside an installed package"):
        embedding_cache_dir(bad)
    # a description cache the describer already wrote into a dataset folder of the user's is used in place
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "mine.descriptions.jsonl").write_text("")
    mine = Config(model="VLM4Rec", dataset="mine", config_dict={"data_path": str(tmp_path)})
    assert description_dir(mine) == tmp_path / "saved" / "descriptions" / "mine"
    mine = Config(model="VLM4Rec", dataset="ds", config_dict={"data_path": str(tmp_path)})
    (tmp_path / "ds" / "ds.descriptions.jsonl").write_text("")
    assert description_dir(mine) == tmp_path / "ds"


# ------------------------------------------------------------------------------ 3, 4. progress, tracking
def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for run in os.listdir(folder):
        acc = EventAccumulator(os.path.join(folder, run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return tags


class _FakeWandb:
    """Records what RecBole's WandbLogger and the stage tracker send (wandb itself is not installed)."""

    def __init__(self):
        import importlib.machinery

        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # other libraries probe for wandb
        self.run, self.logged, self.defined = None, [], []

    def init(self, **kwargs):
        self.run = type("Run", (), {"summary": {}})()

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, metrics, commit=True):
        self.logged.append(dict(metrics))


def test_prime_stages_report_to_tensorboard_and_wandb_in_the_run_of_recbole(tiny_dataset, tmp_path, monkeypatch):
    import sys

    from recbole_mm.quick_start import run_recbole_mm
    from test_prime import _prime_config

    import logging

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    # pytest's own root handlers stop RecBole's init_logger (logging.basicConfig) from adding its log file
    monkeypatch.setattr(logging.root, "handlers", [])
    data_path, name = tiny_dataset
    cfg = {**_prime_config(data_path, tmp_path), "log_wandb": True, "preference_optimization": True,
           "pref_train_examples": 16, "pref_batch_size": 8, "pref_valid_every": 1, "pref_valid_users": 8,
           "pref_epochs": 1, "show_progress": True}
    result = run_recbole_mm("PRIME", name, config_dict=cfg)
    runs = os.listdir("log_tensorboard")
    assert len(runs) == 1 and runs[0].startswith(f"PRIME-{name}-")  # one run, named model-dataset-time
    tags = _scalars("log_tensorboard")
    assert {"ranker/loss", "ranker/valid_ndcg@10", "preference/loss", "preference/valid_ndcg@10"} <= set(tags)
    assert "Loss/Train" in tags  # the retriever's RecBole loop wrote into the same run
    ranker_curve = sorted(tags["ranker/valid_ndcg@10"])
    assert [s for s, _ in ranker_curve] == [h["step"] for h in result["curves"]["ranker"]]
    assert [round(v, 5) for _, v in ranker_curve] == [round(h["valid_ndcg@10"], 5) for h in result["curves"]["ranker"]]
    assert ("ranker/*", "ranker_step") in fake.defined
    assert any("preference/loss" in m and "preference_step" in m for m in fake.logged)
    assert [e["epoch"] for e in result["curves"]["retriever"]] == [1]


def test_progress_bars_honour_show_progress(capsys):
    from recbole_mm.trainer.tracking import progress

    with progress(3, "ranker", {"show_progress": False}) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    with progress(3, "ranker", {"show_progress": True}) as bar:
        bar.update(3)
    assert "ranker" in capsys.readouterr().err


def test_tuning_writes_a_log_per_trial(tiny_dataset):
    from recbole_mm.quick_start import objective_function

    data_path, name = tiny_dataset
    for lr in (0.01, 0.001):
        objective_function({**tiny_config(data_path, learning_rate=lr), "model": "LRURec", "dataset": name})
    logs = os.listdir(os.path.join("log", "LRURec"))
    assert len(logs) == 2 and all(f.startswith(f"LRURec-{name}-") for f in logs)
    assert all(not d.startswith("model-") for d in os.listdir("log_tensorboard"))
