"""Use a trained model: every run reloads from its saved_model_file in a new process with the same
test metrics and the same recommendations as the live model of the run; stale or missing artefacts,
unknown users and items are one-line errors; PRIME's adapter loads with peft outside the project."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
import recbole_mm.manifest as manifest_module
from recbole_mm.errors import CheckpointError, UserError
from recbole_mm.quick_start import run_recbole_mm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USERS = ["u0001", "u0007", "u0030"]
HISTORY = ["i0003", "i0010", "i0021"]

RELOAD = """
import json, sys
from recbole_mm.recommend import Recommender, evaluate_saved
model_file, users, history = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
test = evaluate_saved(model_file)
rec = Recommender.from_file(model_file)
print("RESULT " + json.dumps({"test": test, "users": rec.recommend(users=users, k=5),
                             "history": rec.recommend(history=history, k=5)}))
"""


def _reload_in_new_process(model_file, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", RELOAD, model_file, ",".join(USERS), ",".join(HISTORY)],
                          capture_output=True, text=True, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def _train_capturing_live_recommendations(monkeypatch, model, name, cfg):
    """Run; when the run writes its manifest, ask the live (just trained) model for recommendations."""
    from recbole_mm.recommend import Recommender
    from recbole_mm.utils import create_dataset

    live = {}
    original = manifest_module.write_manifest

    def capture(config, result, trainer, trained):
        if config["model"] == model:
            rec = Recommender(config, trained, create_dataset(config))
            live["users"] = rec.recommend(users=USERS, k=5)
            live["history"] = rec.recommend(history=HISTORY, k=5)
        return original(config, result, trainer, trained)

    monkeypatch.setattr(manifest_module, "write_manifest", capture)
    result = run_recbole_mm(model, name, config_dict=cfg)
    return result, live


def _same_recommendations(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["user"] == y["user"] and x["history"] == y["history"]
        assert [i["item"] for i in x["items"]] == [i["item"] for i in y["items"]]
        for i, j in zip(x["items"], y["items"]):
            assert i["score"] == pytest.approx(j["score"], rel=1e-5, abs=1e-6)
            assert i["title"] == j["title"]
            assert i.get("retriever_rank") == j.get("retriever_rank")


def _prime_config(data_path, tmp_path):
    return tiny_config(
        data_path, MAX_ITEM_LIST_LENGTH=10, mask_history=True,
        retriever_config={"epochs": 1, "hidden_size": 16, "train_batch_size": 64},
        ranker_model="small", ranker_small={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
        n_candidates=6, topk=[1, 5, 6], valid_metric="NDCG@5", max_history_items=4, attr_max_tokens=8,
        image_min_pixels=784, image_max_pixels=784, ranker_train_examples=12, ranker_valid_users=6,
        ranker_batch_size=2, ranker_grad_accum=2, ranker_eval_batch_size=8, ranker_warmup_steps=1,
        ranker_valid_every=2, ranker_patience=2, artifacts_dir=str(tmp_path / "artifacts"),
        preference_optimization=False)


def _vlm4rec_config(data_path, tmp_path, fusion):
    return tiny_config(data_path, text_source="title", fusion=fusion, text_encoder="small",
                       image_encoder="small", image_min_pixels=784, image_max_pixels=784, mask_history=True,
                       artifacts_dir=str(tmp_path / "artifacts"), epochs=2, train_batch_size=32)


CONFIGS = {
    "LRURec": lambda data, tmp: tiny_config(data, mask_history=True, epochs=2),
    "VLM4Rec": lambda data, tmp: _vlm4rec_config(data, tmp, "text"),
    "VLM4Rec-gating": lambda data, tmp: _vlm4rec_config(data, tmp, "gating"),
    "PRIME": _prime_config,
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_trained_model_reloads_in_a_new_process_with_the_same_metrics_and_recommendations(
        case, tiny_dataset, tmp_path, monkeypatch):
    data_path, name = tiny_dataset
    model = case.split("-")[0]
    result, live = _train_capturing_live_recommendations(monkeypatch, model, name, CONFIGS[case](data_path, tmp_path))
    assert result["saved_model_file"] and os.path.isfile(result["saved_model_file"])
    assert os.path.isfile(result["manifest_file"])
    stored = torch.load(result["manifest_file"], weights_only=True)  # plain data, safe to load
    assert stored["test_result"] == pytest.approx(result["test_result"])
    again = _reload_in_new_process(result["manifest_file"], str(tmp_path))
    assert again["test"] == pytest.approx(result["test_result"], abs=1e-4)  # RecBole rounds to 4 digits
    _same_recommendations(again["users"], live["users"])
    _same_recommendations(again["history"], live["history"])
    for rec in live["users"]:  # mask_history: True -> no input item is recommended
        assert not set(rec["history"]) & {i["item"] for i in rec["items"]}
        assert all(i["title"].startswith("Item ") for i in rec["items"])
    if model == "PRIME":
        roles = set(stored["artifacts"])
        assert {"retriever", "ranker_adapter", "ranker_backbone"} <= roles
        assert stored["artifacts"]["ranker_adapter"]["kind"] == "folder"  # peft's folder is the adapter
        for rec in live["users"]:
            # the ranker's order inside the retriever's top n_candidates, then the retriever's order
            assert all(i["ranker_score"] is not None for i in rec["items"])  # k=5 <= n_candidates=6
            assert {i["retriever_rank"] for i in rec["items"]} <= set(range(1, 7))
            ranker = [i["ranker_score"] for i in rec["items"]]
            assert ranker == sorted(ranker, reverse=True)
        from recbole_mm.quick_start import load_data_and_model

        _adapter_loads_with_peft(stored["artifacts"], load_data_and_model(result["manifest_file"])[1])
        weights = os.path.join(stored["artifacts"]["ranker_adapter"]["path"], "adapter_model.safetensors")
        data = bytearray(open(weights, "rb").read())
        data[-1] ^= 1  # one bit of a LoRA weight: same size, other content
        with open(weights, "wb") as f:
            f.write(bytes(data))
        with pytest.raises(CheckpointError, match=r"its ranker_adapter folder .* \(SHA-256 of its files differs\)"):
            load_data_and_model(result["manifest_file"])
        shutil.rmtree(stored["artifacts"]["ranker_adapter"]["path"])
        with pytest.raises(CheckpointError, match=r"its ranker_adapter folder .*adapter is missing"):
            load_data_and_model(result["saved_model_file"])
    if case == "VLM4Rec":
        assert "text_embeddings" in stored["artifacts"] and "checkpoint" not in stored["artifacts"]


def _adapter_loads_with_peft(artifacts, model):
    """The ranker's LoRA adapter, saved with peft's save_pretrained, loads with plain peft +
    transformers onto the backbone, and holds exactly the weights of the reloaded run's ranker."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    folder = artifacts["ranker_adapter"]["path"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    base = AutoModelForImageTextToText.from_pretrained(artifacts["ranker_backbone"]["path"])
    loaded = dict(PeftModel.from_pretrained(base, folder).named_parameters())
    trained = {n: p for n, p in model.ranker.model.named_parameters() if "lora_" in n}
    assert trained
    for name, value in trained.items():
        torch.testing.assert_close(loaded[name].detach(), value.detach().cpu(), rtol=0, atol=0)


def test_missing_or_changed_artefact_and_changed_data_are_one_line_errors(tiny_dataset, tmp_path):
    from recbole_mm.quick_start import load_data_and_model

    data_path, name = tiny_dataset
    result = run_recbole_mm("LRURec", name, config_dict=tiny_config(data_path))
    manifest = result["manifest_file"]
    checkpoint = result["saved_model_file"]
    assert load_data_and_model(checkpoint)[1] is not None and load_data_and_model(manifest)[1] is not None
    with pytest.raises(CheckpointError, match="no model file given"):
        load_data_and_model(None)
    original = open(checkpoint, "rb").read()
    with open(checkpoint, "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match=r"its checkpoint file .* has changed since the run") as err:
        load_data_and_model(manifest)
    assert "\n" not in str(err.value)
    os.remove(checkpoint)
    with pytest.raises(CheckpointError, match=r"its checkpoint file .* is missing"):
        load_data_and_model(manifest)
    with open(checkpoint, "wb") as f:
        f.write(original)
    inter = os.path.join(data_path, name, f"{name}.inter")
    with open(inter, "a", encoding="utf-8") as f:
        f.write("u0001\ti0001\t999\n")
    with pytest.raises(CheckpointError, match=rf"dataset file .*{name}.inter has changed since the run"):
        load_data_and_model(manifest)


def test_unknown_user_or_item_and_cli_output(tiny_dataset, tmp_path):
    from recbole_mm.recommend import Recommender

    data_path, name = tiny_dataset
    result = run_recbole_mm("LRURec", name, config_dict=tiny_config(data_path))
    rec = Recommender.from_file(result["saved_model_file"])
    with pytest.raises(UserError, match="unknown user 'nobody'"):
        rec.recommend(users=["u0001", "nobody"])
    with pytest.raises(UserError, match="unknown item 'i9999'"):
        rec.recommend(history=["i0001", "i9999"])
    with pytest.raises(UserError, match="k=0"):
        rec.recommend(users=["u0001"], k=0)
    # batched: the same answers one user at a time and all together
    together = rec.recommend(users=USERS, k=4, batch_size=2)
    for user, answer in zip(USERS, together):
        _same_recommendations([answer], rec.recommend(users=[user], k=4))

    env = {**os.environ, "PYTHONPATH": ROOT}
    cli = [sys.executable, os.path.join(ROOT, "run_recbole_mm.py"), "recommend",
           f"--model_file={result['manifest_file']}"]
    proc = subprocess.run(cli + ["--user=u0001,u0007", "--k=3", "--jsonl"], capture_output=True, text=True,
                          cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    _same_recommendations(lines, rec.recommend(users=["u0001", "u0007"], k=3))
    proc = subprocess.run(cli + ["--user=ghost"], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: unknown user 'ghost'")
    assert "Traceback" not in proc.stderr


def test_explain_prime_prompt_candidates_and_letter_probabilities(tiny_dataset, tmp_path):
    from recbole_mm.explain import explain
    from recbole_mm.recommend import Recommender

    data_path, name = tiny_dataset
    result = run_recbole_mm("PRIME", name, config_dict=_prime_config(data_path, tmp_path))
    rec = Recommender.from_file(result["saved_model_file"])
    out = explain(rec, str(tmp_path / "why.md"), user="u0007", k=5)
    text = open(out, encoding="utf-8").read()
    top = rec.recommend(users=["u0007"], k=6)[0]["items"]  # k = n_candidates: every candidate
    table = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "`" in line]
    candidates = [row for row in table if len(row) == 8]
    assert [row[1].strip(" `") for row in candidates] == [i["item"] for i in top]  # ranker order = recommend order
    assert sorted(int(row[4]) for row in candidates) == list(range(1, 7))  # the retriever's top 6
    assert [int(row[6]) for row in candidates] == list(range(1, 7))
    assert sum(float(row[7]) for row in candidates) == pytest.approx(1.0, abs=0.01)
    for row, item in zip(candidates, top):
        assert float(row[5]) == pytest.approx(item["ranker_score"], abs=1e-4)
        assert int(row[4]) == item["retriever_rank"]
    prompt = text.split("```text\n", 1)[1].split("\n```", 1)[0]
    images = sorted(os.listdir(tmp_path / "why_images"))
    assert images and prompt.count("<|image_pad|>") == len(images)  # one placeholder per written image
    for token in rec.recommend(users=["u0007"], k=6)[0]["history"][-4:]:  # max_history_items=4
        assert rec.title(rec.item_id(token)) in prompt


def test_explain_vlm4rec_history_shares_add_up_to_each_score(tiny_dataset, tmp_path):
    from recbole_mm.explain import explain, history_shares
    from recbole_mm.recommend import Recommender

    data_path, name = tiny_dataset
    result = run_recbole_mm("VLM4Rec", name, config_dict=_vlm4rec_config(data_path, tmp_path, "text"))
    rec = Recommender.from_file(result["saved_model_file"])
    answer = rec.recommend(users=["u0001"], k=5)[0]
    window = [rec.item_id(t) for t in answer["history"]][-rec.config["MAX_ITEM_LIST_LENGTH"]:]
    for item in answer["items"]:  # the score comes from full_sort_predict; the shares from the item vectors
        assert sum(history_shares(rec, window, item["item"])) == pytest.approx(item["score"], abs=1e-5)
    text = open(explain(rec, str(tmp_path / "why.md"), user="u0001", k=5), encoding="utf-8").read()
    assert "Which history items make each recommendation" in text and answer["items"][0]["item"] in text


def test_general_recbole_model_recommends_known_users_without_their_items(tiny_dataset):
    from recbole_mm.recommend import Recommender, evaluate_saved

    data_path, name = tiny_dataset
    cfg = tiny_config(data_path, embedding_size=8)
    cfg.pop("MAX_ITEM_LIST_LENGTH")
    result = run_recbole_mm("BPR", name, config_dict=cfg)
    assert evaluate_saved(result["manifest_file"]) == pytest.approx(result["test_result"], abs=1e-4)
    rec = Recommender.from_file(result["saved_model_file"])
    for answer in rec.recommend(users=USERS, k=10):  # RecBole's protocol: known items are never ranked
        assert not set(answer["history"]) & {i["item"] for i in answer["items"]}
    with pytest.raises(UserError, match="BPR is not a sequential model"):
        rec.recommend(history=HISTORY)


def test_reload_from_another_working_folder_with_relative_paths(tmp_path, monkeypatch):
    """A run given relative paths (data, checkpoints, artefacts) reloads from any folder."""
    from recbole_mm.data.fixtures import FixtureSpec, make_fixture
    from recbole_mm.recommend import Recommender

    make_fixture(tmp_path / "data", "mmfix", FixtureSpec(n_users=30, n_items=20, min_len=5, max_len=10, seed=2))
    cfg = _vlm4rec_config("data", tmp_path, "text")
    cfg["artifacts_dir"] = "artefacts"
    result = run_recbole_mm("VLM4Rec", "mmfix", config_dict=cfg)
    here = Recommender.from_file(result["saved_model_file"]).recommend(users=["u0001"], k=5)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _same_recommendations(Recommender.from_file(result["saved_model_file"]).recommend(users=["u0001"], k=5), here)
    assert not (elsewhere / "artefacts").exists()  # the run's small text encoder was used, not rebuilt here
