"""Plugin mechanics: registry, errors, config layering, light import, packaged property files."""

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import tiny_config
from recbole_mm.config import Config, properties_dir
from recbole_mm.utils import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_get_model_plugin_first_then_recbole():
    assert get_model("LRURec").__module__ == "recbole_mm.model.lrurec"
    assert get_model("SASRec").__module__.startswith("recbole.model.sequential_recommender")
    assert get_model("BPR").__module__.startswith("recbole.model.general_recommender")


def test_unknown_model_error_lists_models_and_suggests():
    with pytest.raises(ValueError) as err:
        get_model("LRURek")
    text = str(err.value)
    assert "Did you mean LRURec" in text and "SASRec" in text and "BERT4Rec" in text


def test_import_is_light():
    code = ("import sys, recbole_mm, recbole_mm.utils, recbole_mm.config, recbole_mm.quick_start; "
            "bad = [m for m in ('transformers', 'peft', 'bitsandbytes', 'ray', 'recbole.quick_start') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_overall_yaml_keeps_recbole_baseline_hyperparameters(tiny_dataset):
    from recbole.config import Config as RecBoleConfig

    data_path, name = tiny_dataset
    ours = Config("SASRec", name, config_dict={"data_path": data_path})
    theirs = RecBoleConfig("SASRec", name, config_dict={"data_path": data_path, "train_neg_sample_args": None})
    for key in ("n_layers", "n_heads", "hidden_size", "inner_size", "hidden_dropout_prob", "attn_dropout_prob",
                "loss_type", "learning_rate", "train_batch_size", "epochs", "learner", "weight_decay",
                "stopping_step", "MAX_ITEM_LIST_LENGTH", "eval_args"):
        assert ours[key] == theirs[key], key
    # what RecBole demands for CE (its examples write it by hand), set for the user
    assert ours["train_neg_sample_args"] == theirs["train_neg_sample_args"]
    assert ours["train_neg_sample_args"]["distribution"] == "none"
    assert ours["metrics"] == ["Recall", "MRR", "NDCG"] and ours["valid_metric"] == "NDCG@10"


def test_model_yaml_and_user_overrides_layer_correctly(tiny_dataset):
    data_path, name = tiny_dataset
    config = Config("LRURec", name, config_dict={"data_path": data_path, "weight_decay": 0.5},
                    argv=["--dropout_prob=0.3"])
    assert config["learner"] == "adamw"  # from properties/model/LRURec.yaml
    assert config["weight_decay"] == 0.5 and config["dropout_prob"] == 0.3
    with pytest.raises(ValueError, match="--key=value"):
        Config("LRURec", name, config_dict={"data_path": data_path}, argv=["--oops"])


def test_train_positions_all_is_refused_for_models_without_support(tiny_dataset):
    data_path, name = tiny_dataset
    with pytest.raises(ValueError, match="not supported by SASRec"):
        Config("SASRec", name, config_dict=tiny_config(data_path, train_positions="all"))


def test_property_files_ship_in_the_wheel(tmp_path):
    assert os.path.isfile(os.path.join(properties_dir(), "overall.yaml"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), ROOT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    for f in ("recbole_mm/properties/overall.yaml", "recbole_mm/properties/model/LRURec.yaml",
              "recbole_mm/properties/hyper/LRURec.hyper"):
        assert f in names, f
