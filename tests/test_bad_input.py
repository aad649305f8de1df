"""Bad input gets one line ``error: ...`` and exit code 2 (never a traceback); code in settings is
never run; bugs keep their traceback. Each case of the README table "Bad input and what it gets"."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import tiny_config
from recbole_mm.cli import main as cli_main
from recbole_mm.config import Config, parse_value
from recbole_mm.errors import CheckpointError, ConfigError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = "__import__('os').system('touch PWNED')"


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _run_cli(capsys, *args):
    by_key = {}
    for a in args:  # a test's own --key=value replaces _base's
        by_key[a.split("=", 1)[0]] = a
    return _one_line_error(capsys, cli_main(list(by_key.values())))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dataset, a second one with more items, and a 1-epoch LRURec checkpoint of the first."""
    from recbole_mm.data.fixtures import FixtureSpec, make_fixture
    from recbole_mm.quick_start import run_recbole_mm

    root = tmp_path_factory.mktemp("bad_input")
    make_fixture(root / "data", "mmfix", FixtureSpec(n_users=40, n_items=30, min_len=5, max_len=12, seed=1))
    make_fixture(root / "data", "other", FixtureSpec(n_users=40, n_items=45, min_len=5, max_len=12, seed=2))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = run_recbole_mm("LRURec", "mmfix", config_dict=tiny_config(str(root / "data"),
                                                                           checkpoint_dir=str(root / "saved")))
    finally:
        os.chdir(cwd)
    return {"data": str(root / "data"), "ckpt": result["saved_model_file"]}


def _base(trained, model="LRURec", dataset="mmfix"):
    return [f"--model={model}", f"--dataset={dataset}", f"--data_path={trained['data']}", "--epochs=1",
            "--hidden_size=16", "--show_progress=False", "--state=ERROR",
            "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}"]


# ------------------------------------------------------------------ settings: types, no eval
@pytest.mark.parametrize("override, expect", [
    ("--epochs=abc", "epochs='abc' is not an integer"),
    ("--hidden_size=1.5", "hidden_size=1.5 is not an integer"),
    ("--epochs=1/0", "epochs='1/0' is not an integer"),
    ("--learning_rate=fast", "learning_rate='fast' is not a number"),
    ("--show_progress=maybe", "show_progress='maybe' is not True or False"),
])
def test_wrong_type_is_one_line_naming_key_value_and_type(trained, capsys, override, expect):
    line = _run_cli(capsys, *_base(trained), override)
    assert "command line: " + expect in line and "expects" in line


def test_code_in_an_override_is_not_run(trained, capsys, tmp_path):
    line = _run_cli(capsys, *_base(trained), f"--epochs={PAYLOAD}")
    assert not (tmp_path / "PWNED").exists()
    assert "epochs=" in line and "is not an integer" in line and "expressions are not evaluated" in line


def test_code_in_a_config_dict_string_or_an_unchecked_key_stays_text(tmp_path):
    config = Config("SASRec", "ml-100k", config_dict={"my_note": PAYLOAD}, argv=[f"--other_note={PAYLOAD}"])
    assert config["my_note"] == PAYLOAD and config["other_note"] == PAYLOAD
    with pytest.raises(ConfigError, match="config_dict: epochs="):
        Config("SASRec", "ml-100k", config_dict={"epochs": PAYLOAD})
    assert not (tmp_path / "PWNED").exists()


def test_literal_values_still_parse():
    assert parse_value("5") == 5 and parse_value("1e-3") == 0.001 and parse_value("[5, 10]") == [5, 10]
    assert parse_value("true") is True and parse_value("False") is False and parse_value("None") is None
    assert parse_value("{'inter': ['user_id']}") == {"inter": ["user_id"]} and parse_value("SASRec") == "SASRec"
    assert parse_value("(1).__class__") == "(1).__class__" and parse_value("1/0") == "1/0"
    config = Config("SASRec", "ml-100k", argv=["--learning_rate=1e-3", "--show_progress=false", "--topk=[5,10]",
                                               "--load_col={'inter': ['user_id', 'item_id']}", "--dropout_prob=0"])
    assert config["learning_rate"] == 0.001 and config["show_progress"] is False and config["topk"] == [5, 10]
    assert config["load_col"] == {"inter": ["user_id", "item_id"]} and config["dropout_prob"] == 0


def test_params_file_is_parsed_without_eval(tmp_path, capsys):
    from recbole_mm.hyper import main as hyper_main, read_params_file

    good = tmp_path / "good.hyper"
    good.write_text("dropout_prob choice [0.1,0.3]\nlearning_rate loguniform -8,0\n")
    space = read_params_file(str(good))
    assert set(space) == {"dropout_prob", "learning_rate"}
    bad = tmp_path / "bad.hyper"
    bad.write_text("dropout_prob choice [0.1,0.3]\n" f"hidden_size choice {PAYLOAD.replace(' ', '')}\n")
    with pytest.raises(ConfigError, match=r"bad.hyper, line 2: choice values must be a literal list"):
        read_params_file(str(bad))
    rc = hyper_main(["--model=LRURec", "--dataset=ml-100k", f"--params_file={bad}"])
    assert "line 2" in _one_line_error(capsys, rc)
    assert not (tmp_path / "PWNED").exists()
    odd = tmp_path / "odd.hyper"
    odd.write_text("lr normal 0,1\n")
    with pytest.raises(ConfigError, match="line 1: unknown type 'normal'"):
        read_params_file(str(odd))


def test_malformed_yaml_names_file_and_line(trained, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nfoo: [1, 2\nbar: 3\n")
    line = _run_cli(capsys, *_base(trained), f"--config_files={bad}")
    assert f"config file {bad}, line 3" in line and "malformed yaml" in line


def test_yaml_python_tags_are_refused_not_run(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("epochs: !!python/object/apply:os.system ['touch PWNED']\n")
    with pytest.raises(ConfigError, match=r"evil.yaml, line 1"):
        Config("SASRec", "ml-100k", config_file_list=[str(evil)])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"note: caf\xe9\n")
    with pytest.raises(ConfigError, match="latin.yaml: bytes that are not UTF-8 at byte 9"):
        Config("SASRec", "ml-100k", config_file_list=[str(latin)])
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs\n- 5\n")
    with pytest.raises(ConfigError, match="expected `key: value` settings"):
        Config("SASRec", "ml-100k", config_file_list=[str(listed)])
    assert not (tmp_path / "PWNED").exists()


def test_recbole_eval_of_kd_dagfm_teacher_is_not_reached(tmp_path):
    with pytest.raises(ConfigError, match="teacher=.* is not one of 'CrossNet', 'CIN'"):
        Config("KD_DAGFM", "ml-100k", argv=[f"--teacher={PAYLOAD}"])
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------ checked before training
@pytest.mark.parametrize("argv, expect", [
    (["--topk=[5]"], "valid_metric='NDCG@10' needs k=10 in topk=[5]"),
    (["--valid_metric=NDCG@x"], "the part after '@' must be an integer"),
    (["--valid_metric=Hit@10"], "valid_metric='Hit@10' is not among metrics"),
    (["--topk=[0]"], "settings refused by RecBole: topk must be a positive integer"),
])
def test_topk_and_valid_metric_are_checked_with_the_config(argv, expect):
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        Config("SASRec", "ml-100k", argv=argv)


@pytest.mark.parametrize("argv, expect", [
    (["--n_candidates=0"], "n_candidates=0: PRIME's ranker letters its candidates A..Z"),
    (["--n_candidates=27"], "n_candidates=27"),
    (["--retriever=BPR"], "retriever='BPR' is not a sequential model"),
    (["--retriever=NoSuchModel"], "Unknown model 'NoSuchModel'"),
])
def test_prime_settings_are_checked_with_the_config(argv, expect):
    with pytest.raises(ConfigError, match=expect):
        Config("PRIME", "ml-100k", argv=argv)


def test_topk_larger_than_the_item_count_stops_before_training(trained, capsys, tmp_path):
    line = _run_cli(capsys, *_base(trained), "--topk=[10,100]", f"--checkpoint_dir={tmp_path / 'saved'}")
    assert "topk=[10, 100]: dataset 'mmfix' has only 30 items" in line
    assert not list(tmp_path.rglob("*.pth"))  # nothing trained


def test_prime_with_more_candidates_than_items(tmp_path, capsys):
    from recbole_mm.data.fixtures import FixtureSpec, make_fixture

    make_fixture(tmp_path / "d", "few", FixtureSpec(n_users=30, n_items=12, min_len=5, max_len=9, seed=3))
    line = _run_cli(capsys, "--model=PRIME", "--dataset=few", f"--data_path={tmp_path / 'd'}", "--n_candidates=20",
                    "--ranker_model=small",  # the preflight would first try to reach the hub
                    "--topk=[5,10]", "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}", "--state=ERROR",
                    f"--artifacts_dir={tmp_path / 'art'}")
    assert "n_candidates=20: dataset 'few' has only 12 items" in line
    assert not (tmp_path / "art").exists()  # no stage started


def test_result_file_in_a_missing_folder_is_refused_first(trained, capsys, tmp_path):
    line = _run_cli(capsys, *_base(trained), f"--result_file={tmp_path / 'nowhere' / 'r.json'}")
    assert f"folder {tmp_path / 'nowhere'} does not exist" in line
    line = _run_cli(capsys, *_base(trained), f"--result_file={tmp_path}")
    assert "is a folder" in line
    assert not (tmp_path / "log").exists()  # refused before RecBole's logger was even set up


def test_resume_file_that_does_not_exist(trained, capsys, tmp_path):
    line = _run_cli(capsys, *_base(trained), f"--resume={tmp_path / 'missing.pth'}")
    assert "--resume=" in line and "no such checkpoint file" in line


# ------------------------------------------------------------------ checkpoints
def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_empty_corrupt_and_foreign_checkpoints(trained, capsys, tmp_path):
    cases = {
        _write(tmp_path / "empty.pth", b""): "is empty (0 bytes",
        _write(tmp_path / "garbage.pth", b"PK\x03\x04" + b"\x00garbage" * 50): "not a readable PyTorch checkpoint",
        _write(tmp_path / "text.pth", b"hello world, not a checkpoint"): "not a readable PyTorch checkpoint",
        _write(tmp_path / "half.pth", open(trained["ckpt"], "rb").read()[:3000]): "not a readable PyTorch checkpoint",
    }
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases[str(tmp_path / "list.pth")] = "not a recbole-mm run checkpoint"
    for path, expect in cases.items():
        line = _run_cli(capsys, *_base(trained), f"--resume={path}")
        assert path in line and expect in line, line


def test_unsafe_checkpoint_is_refused_without_suggesting_unsafe_loading(trained, capsys, tmp_path):
    bad = tmp_path / "recbole_style.pth"
    torch.save({"config": Config("LRURec", "mmfix", config_dict={"data_path": trained["data"]})}, bad)
    line = _run_cli(capsys, *_base(trained), f"--resume={bad}")
    assert "refused" in line and "(recbole_mm.config.Config)" in line and "retrain with recbole-mm" in line
    assert "weights_only=False" not in line and "weights_only = False" not in line


def test_checkpoint_of_another_model(trained, capsys):
    line = _run_cli(capsys, *_base(trained, model="SASRec"), f"--resume={trained['ckpt']}")
    assert "is for model LRURec, not SASRec" in line


def test_checkpoint_of_another_dataset(trained, capsys):
    line = _run_cli(capsys, *_base(trained, dataset="other"), f"--resume={trained['ckpt']}")
    assert "does not fit this model (trained on dataset 'mmfix', this run uses 'other')" in line
    assert "size mismatch" in line


def test_load_data_and_model_of_a_corrupt_file(tmp_path):
    from recbole_mm.quick_start import load_data_and_model

    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_data_and_model(_write(tmp_path / "x.pth", b"\x80\x02garbage"))
    with pytest.raises(CheckpointError, match="Unsupported operand") as info:
        load_data_and_model(str(tmp_path / "x.pth"))
    assert "weights_only=False" not in str(info.value)


# ------------------------------------------------------------------ CLI: bugs keep tracebacks
def test_non_user_errors_keep_their_traceback(monkeypatch):
    import recbole_mm.quick_start

    def boom(**kwargs):
        raise ValueError("a bug deep in training")

    monkeypatch.setattr(recbole_mm.quick_start, "run_recbole_mm", boom)
    with pytest.raises(ValueError, match="a bug deep in training"):
        cli_main(["--model=LRURec", "--dataset=ml-100k"])
    from recbole_mm.errors import DataFormatError
    from recbole_mm.lmm.backbone import BackboneLoadError
    from recbole_mm.lmm.sentence_encoder import EncoderLoadError
    from recbole_mm.lmm.verbalizer import VerbalizerError

    assert all(issubclass(c, UserError) for c in (DataFormatError, BackboneLoadError, EncoderLoadError,
                                                  VerbalizerError, ConfigError, CheckpointError))


def test_real_entry_point_prints_one_line(trained, tmp_path):
    argv = [a for a in _base(trained) if a != "--epochs=1"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_recbole_mm.py"), *argv, f"--epochs={PAYLOAD}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert not (tmp_path / "PWNED").exists()


def test_bench_bad_model_args(capsys, tmp_path):
    from recbole_mm.bench import main as bench_main

    rc = bench_main(["--dataset=x", "--models=SASRec", f"--out={tmp_path / 'o'}", "--model_args=SASRec"])
    assert "must look like Model:key=value" in _one_line_error(capsys, rc)


# ------------------------------------------------------------------ image paths
def _store_with_images(tmp_path, images: dict):
    from recbole_mm.files import write_jsonl
    from recbole_mm.data.item_store import ItemStore

    folder = tmp_path / "imgs"
    (folder / "images").mkdir(parents=True)
    write_jsonl(folder / "imgs.items.jsonl", [{"item_id": k, "title": k, "image": v} for k, v in images.items()])
    return ItemStore(folder, ["[PAD]", *images])


def test_unusable_image_paths_count_as_missing(tmp_path, caplog):
    loop = tmp_path / "imgs" / "images" / "loop.png"
    store_paths = {"loop": "images/loop.png", "nul": "images/a\x00b.png", "long": "images/" + "x" * 5000 + ".png"}
    (tmp_path / "imgs" / "images").mkdir(parents=True)
    os.symlink(loop.name, loop)  # points at itself
    from recbole_mm.files import write_jsonl
    from recbole_mm.data.item_store import ItemStore

    folder = tmp_path / "imgs"
    write_jsonl(folder / "imgs.items.jsonl", [{"item_id": k, "image": v} for k, v in store_paths.items()])
    store = ItemStore(folder, ["[PAD]", *store_paths])
    with caplog.at_level(logging.INFO):
        for i in (1, 2, 3):
            assert store.has_image(i) is False and store.image(i) is None and store.image(i) is None
    assert store.images([1, 2, 3]) == [None, None, None]


def test_extreme_aspect_ratio_is_padded_and_logged_once(tmp_path, caplog):
    from recbole_mm.data.item_store import MAX_ASPECT_RATIO

    store = _store_with_images(tmp_path, {"wide": "images/wide.png", "tall": "images/tall.png"})
    Image.new("RGB", (6000, 3), (200, 10, 10)).save(tmp_path / "imgs" / "images" / "wide.png")
    Image.new("RGB", (3, 6000), (10, 200, 10)).save(tmp_path / "imgs" / "images" / "tall.png")
    with caplog.at_level(logging.WARNING):
        for i in (1, 2):
            img = store.image(i)
            assert img is not None and max(img.size) / min(img.size) <= MAX_ASPECT_RATIO + 1
            assert img.width * img.height <= store.max_pixels
            store._cache.clear()
            assert store.image(i).size == img.size
    padded = [r for r in caplog.records if "padded" in r.getMessage()]
    assert len(padded) == 2 and "wide" in padded[0].getMessage() and "6000x3" in padded[0].getMessage()
    centre = store.image(1)
    assert centre.getpixel((centre.width // 2, centre.height // 2))[0] > 20  # the strip, centred ...
    assert centre.getpixel((centre.width // 2, 0)) == (0, 0, 0)  # ... on black
