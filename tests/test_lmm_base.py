"""What every LMM recommender shares: the LMM base yaml, defaults read from it, build_backbone,
prompt templates, batched scoring, the one two-stage composition, StageStore.run and stage keys
by rule (end to end on the generated fixture with the tiny model)."""

import math
import os

import pytest
import torch
import yaml

from conftest import tiny_config
from recbole_mm.config import Config, properties_dir
from recbole_mm.lmm.defaults import LMM_BASE, lmm_default, shipped_defaults
from recbole_mm.trainer.stage_store import EVERY_STAGE, StageKeys, StageRule, StageStore


def _yaml(name):
    with open(os.path.join(properties_dir(), "model", f"{name}.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


# ------------------------------------------------------------------------------ base yaml, defaults
def test_prime_yaml_keeps_only_its_own_keys_and_config_layers_the_base_under_it(tiny_dataset):
    base, prime = _yaml("_lmm"), _yaml("PRIME")
    for key in ("ranker_model", "ranker_small", "ranker_quantization", "ranker_dtype", "lora_r", "lora_alpha",
                "lora_dropout", "gradient_checkpointing", "max_history_items", "attr_max_tokens",
                "image_min_pixels", "image_max_pixels", "trust_remote_code", "artifacts_dir"):
        assert key in base, key
    assert set(base) & set(prime) == {"artifacts_dir"}  # PRIME's folder overrides the base's
    data_path, name = tiny_dataset
    config = Config("PRIME", name, config_dict=tiny_config(data_path))
    for key, value in base.items():
        assert config[key] == (prime[key] if key in prime else value), key
    assert config["artifacts_dir"] == "saved/prime"
    user = Config("PRIME", name, config_dict=tiny_config(data_path, lora_r=3, max_history_items=7))
    assert user["lora_r"] == 3 and user["max_history_items"] == 7  # user settings still win over both
    assert "lora_r" not in Config("LRURec", name, config_dict=tiny_config(data_path)).final_config_dict


def test_a_model_class_declaring_the_lmm_base_gets_its_keys(tiny_dataset):
    from recbole.model.sequential_recommender import GRU4Rec

    class TinyLMMRec(GRU4Rec):
        properties_base = LMM_BASE

    data_path, name = tiny_dataset
    config = Config(TinyLMMRec, name, config_dict=tiny_config(data_path, loss_type="CE"))
    assert config["lora_alpha"] == _yaml("_lmm")["lora_alpha"] and config["artifacts_dir"] == "saved/lmm"

    class Broken(GRU4Rec):
        properties_base = "_nope"

    with pytest.raises(ValueError, match="_nope.yaml"):
        Config(Broken, name, config_dict=tiny_config(data_path, loss_type="CE"))


def test_settings_defaults_are_the_shipped_yaml(tiny_dataset):
    from recbole_mm.lmm.backbone import BackboneSettings
    from recbole_mm.lmm.prompts import LetteredJSONTemplate, PromptSettings

    base = _yaml("_lmm")
    s = BackboneSettings()
    assert (s.name_or_path, s.quantization, s.dtype, s.lora_r, s.lora_alpha, s.lora_dropout, s.trust_remote_code,
            s.gradient_checkpointing) == (base["ranker_model"], base["ranker_quantization"], base["ranker_dtype"],
                                          base["lora_r"], base["lora_alpha"], base["lora_dropout"],
                                          base["trust_remote_code"], base["gradient_checkpointing"])
    p = PromptSettings()
    assert (p.max_history, p.attr_max_tokens, p.variant, p.domain) == (
        base["max_history_items"], base["attr_max_tokens"], base["prompt_variant"], base["prompt_domain"])
    assert lmm_default("ranker_small") == base["ranker_small"] and shipped_defaults("PRIME")["lora_r"] == base["lora_r"]
    lmm_default("ranker_small")["hidden_size"] = -1  # a copy: the shipped defaults cannot be changed by a caller
    assert lmm_default("ranker_small") == base["ranker_small"]
    with pytest.raises(KeyError, match="_lmm.yaml"):
        lmm_default("no_such_key")

    data_path, name = tiny_dataset
    config = Config("PRIME", name, config_dict=tiny_config(
        data_path, lora_r=5, lora_dropout=0.0, ranker_dtype="float32", max_history_items=3, attr_max_tokens=4,
        prompt_variant="no_image", prompt_domain="movie", prompt_text="reference",
        ranker_loss_tokens="letter_end_newline", image_min_pixels=784, artifacts_dir="somewhere"))
    b = BackboneSettings.from_config(config, name_or_path="x")
    assert (b.name_or_path, b.lora_r, b.lora_dropout, b.dtype, b.min_pixels, b.cache_dir) == (
        "x", 5, 0.0, "float32", 784, "somewhere")
    t = LetteredJSONTemplate.from_config(config)
    assert (t.settings.max_history, t.settings.attr_max_tokens, t.settings.variant, t.settings.domain) == (
        3, 4, "no_image", "movie")
    assert t.settings.history_header == "Browsing history:" and t.loss_newline and not t.use_images


# ------------------------------------------------------------------------------ stage keys by rule
def test_every_key_of_prime_and_the_base_yaml_is_classified():
    from recbole_mm.trainer.prime import prime_stage_keys

    keys = prime_stage_keys()
    yaml_keys = set(_yaml("_lmm")) | set(_yaml("PRIME"))
    assert set(keys.keys) == yaml_keys
    assert keys.unclassified() == [], "declare these keys: a stage rule, every_stage or evaluation-only"
    expected = {"retriever_config": "retriever", "retriever_checkpoint": "retriever", "lora_r": "ranker",
                "ranker_model": "ranker", "max_history_items": "ranker", "prompt_text": "ranker",
                "image_max_pixels": "ranker", "trust_remote_code": "ranker", "pref_beta": "preference",
                "preference_optimization": "preference", "n_candidates": EVERY_STAGE,
                "ranker_eval_batch_size": None, "rank_only_hits": None, "ranker_log_every": None, "topk": None}
    assert {k: keys.classify(k) for k in expected} == expected
    ranker, preference = keys.stage_keys("ranker"), keys.stage_keys("preference")
    assert {"lora_r", "seed", "mask_history", "n_candidates"} <= set(ranker)
    assert not any(k.startswith("pref_") for k in ranker) and "pref_beta" in preference and "lora_r" not in preference
    assert not set(keys.stage_keys("retriever")) & {"lora_r", "pref_beta", "ranker_epochs"}
    # a key no rule knows (a new setting nobody declared) keys every stage: it retrains, never reuses stale work
    bigger = StageKeys(keys.stages, keys.rules, [*keys.keys, "ranker_new", "pref_new", "brand_new"],
                       keys.every_stage, inputs=keys.inputs)
    assert bigger.unclassified() == ["brand_new"]
    assert bigger.classify("ranker_new") == "ranker" and bigger.classify("pref_new") == "preference"
    assert all("brand_new" in bigger.stage_keys(s) for s in bigger.stages)
    with pytest.raises(ValueError, match="unknown stages"):
        StageKeys(["a"], [StageRule("b", prefixes=("x",))], [])


def _stage_keys(result):
    return {s: result["stages"][s]["key"] for s in ("retriever", "ranker", "preference") if s in result["stages"]}


def _reused(result):
    return {s: bool(result["stages"][s].get("reused")) for s in ("retriever", "ranker", "preference")
            if s in result["stages"]}


def test_stage_keys_end_to_end_ranker_settings_retrain_stage2_topk_reuses(tiny_dataset, tmp_path, monkeypatch):
    from test_prime import _prime_config

    import recbole_mm.trainer.prime as prime_trainer
    from recbole_mm.quick_start import run_recbole_mm

    # a new ranker setting in the shipped yaml joins stage 2's key with no list to update
    shipped = prime_trainer.shipped_defaults
    monkeypatch.setattr(prime_trainer, "shipped_defaults", lambda model: {**shipped(model), "ranker_made_up": 1})
    data_path, name = tiny_dataset
    cfg = {**_prime_config(data_path, tmp_path), "ranker_made_up": 1}
    first = run_recbole_mm("PRIME", name, config_dict=cfg)
    assert _reused(first) == {"retriever": False, "ranker": False}
    same = run_recbole_mm("PRIME", name, config_dict={**cfg, "topk": [1, 2, 5, 6]})
    assert _reused(same) == {"retriever": True, "ranker": True} and _stage_keys(same) == _stage_keys(first)
    for change in ({"lora_r": 4}, {"ranker_made_up": 2}):
        other = run_recbole_mm("PRIME", name, config_dict={**cfg, **change})
        assert _reused(other) == {"retriever": True, "ranker": False}, change
        assert other["stages"]["retriever"]["key"] == first["stages"]["retriever"]["key"]
        assert other["stages"]["ranker"]["key"] != first["stages"]["ranker"]["key"], change


def test_a_preference_setting_retrains_stage3_only(tiny_dataset, tmp_path):
    from test_preference import _stage3_config

    from recbole_mm.quick_start import run_recbole_mm

    data_path, name = tiny_dataset
    cfg = _stage3_config(data_path, tmp_path, pref_valid_users=8, pref_train_examples=32)
    first = run_recbole_mm("PRIME", name, config_dict=cfg)
    assert _reused(first) == {"retriever": False, "ranker": False, "preference": False}
    second = run_recbole_mm("PRIME", name, config_dict={**cfg, "pref_beta": 0.1})
    assert _reused(second) == {"retriever": True, "ranker": True, "preference": False}
    keys, again = _stage_keys(first), _stage_keys(second)
    assert keys["retriever"] == again["retriever"] and keys["ranker"] == again["ranker"]
    assert keys["preference"] != again["preference"]


# ------------------------------------------------------------------------------ StageStore.run
def test_stage_store_run_computes_once_then_loads(tmp_path):
    store = StageStore(tmp_path / "a")
    calls, loaded = [], []

    def compute(folder):
        (folder / "w.txt").write_text("x")
        calls.append(folder)
        return {"score": 1.5}

    assert store.run("s", "k1", compute, lambda f, info: loaded.append(info)) == ({"score": 1.5}, False)
    assert loaded == [] and len(calls) == 1 and (tmp_path / "a" / "s-k1" / "done.json").is_file()
    assert store.run("s", "k1", compute, lambda f, info: loaded.append((f.name, info))) == ({"score": 1.5}, True)
    assert len(calls) == 1 and loaded == [("s-k1", {"score": 1.5})]


def test_stage_store_run_interrupted_leaves_nothing_that_looks_finished(tmp_path):
    store = StageStore(tmp_path)

    def fails_early(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.run("s", "k", fails_early)
    assert not (tmp_path / "s-k").exists()  # nothing written: no folder left behind

    def fails_late(folder):
        (folder / "progress.pth").write_text("resume from here")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.run("s", "k", fails_late)
    assert (tmp_path / "s-k" / "progress.pth").is_file() and store.done("s", "k") is None  # resumable, not done
    seen = []
    info, reused = store.run("s", "k", lambda folder: seen.append((folder / "progress.pth").read_text()) or {"ok": 1})
    assert (info, reused) == ({"ok": 1}, False) and seen == ["resume from here"]


# ------------------------------------------------------------------------------ two-stage scoring
def test_ndcg_at_matches_a_hand_computation():
    from recbole_mm.lmm.candidate_ranker import answer_rank, ndcg_at

    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [1.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    answer_pos = torch.tensor([2, 1, -1, 3])
    ref_rank = []
    for row, pos in zip(scores.tolist(), answer_pos.tolist()):
        ref_rank.append(-1 if pos < 0 else sum(1 for v in row if v > row[pos]))
    assert answer_rank(scores, answer_pos).tolist() == ref_rank == [1, 1, -1, 3]
    for k in (1, 2, 10):
        ref = [0.0 if r < 0 or r >= k else 1 / math.log2(r + 2) for r in ref_rank]
        assert ndcg_at(scores, answer_pos, k).tolist() == pytest.approx(ref)


class _FakeRanker:
    """Scores a candidate by (item id * 7 + history length) % 11: deterministic, order != retriever's."""

    def __init__(self):
        self.batches = []

    def score_in_batches(self, histories, candidates, batch_size=None):
        self.batches.append((len(histories), batch_size))
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.float).unsqueeze(1)
        return ((candidates.float() * 7 + lengths) % 11).reshape(len(histories), -1)


def test_two_stage_scores_one_composition_for_predict_and_evaluation(tiny_dataset):
    from recbole.data.interaction import Interaction

    from recbole_mm.model.prime import PRIME
    from recbole_mm.utils import create_dataset

    data_path, name = tiny_dataset
    config = Config("PRIME", name, config_dict=tiny_config(data_path, n_candidates=5, max_history_items=3,
                                                           retriever_config={"hidden_size": 8}))
    dataset = create_dataset(config)
    model = PRIME(config, dataset).eval()
    g = torch.Generator().manual_seed(0)
    n, L = 6, config["MAX_ITEM_LIST_LENGTH"]
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    seq = torch.randint(1, dataset.item_num, (n, L), generator=g) * (torch.arange(L) < lengths.unsqueeze(1))
    inter = Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths})
    with torch.no_grad():
        retriever = model.retriever_scores(inter)
        assert torch.equal(model.full_sort_predict(inter), retriever)  # no ranker yet: the retriever alone
        model.ranker = _FakeRanker()
        full = model.full_sort_predict(inter)
        top = torch.topk(retriever, 5, dim=1).indices
        answers = torch.where(torch.arange(n) % 2 == 0, top[:, 2], torch.zeros(n, dtype=torch.long))
        partial, ranked = model.two_stage_scores(inter, answers=answers, batch_size=2)
    assert ranked == 3 and model.ranker.batches == [(6, None), (3, 2)]
    for r in range(n):
        hist = seq[r, max(0, int(lengths[r]) - 3):int(lengths[r])].tolist()
        ranker_scores = [(c * 7 + len(hist)) % 11 for c in top[r].tolist()]
        order_in_top = [c for _, i, c in sorted(zip(ranker_scores, range(5), top[r].tolist()), key=lambda t: -t[0])]
        rest = [i for i in torch.argsort(retriever[r], descending=True, stable=True).tolist() if i not in top[r]]
        got = torch.argsort(full[r], descending=True, stable=True).tolist()
        assert set(got[:5]) == set(order_in_top) and got[5:10] == rest[:5]
        assert sorted(full[r, top[r]].tolist(), reverse=True) == full[r, order_in_top].tolist()
        if r % 2 == 0:
            assert torch.equal(partial[r], full[r])  # ranked rows: the same as predict's
        else:
            assert torch.equal(torch.argsort(partial[r], descending=True, stable=True)[:10],
                               torch.argsort(retriever[r], descending=True, stable=True)[:10])


# ------------------------------------------------------------------------------ build_backbone, templates
class _Store:
    """An item store of 12 items: a title and a caption each, a small coloured image."""

    def __len__(self):
        return 13

    def attributes(self, i):
        return {"title": f"movie {i} red blue", "caption": f"a poster of movie {i}"}

    def image(self, i):
        from PIL import Image

        return Image.new("RGB", (28, 28), (20 * i % 256, 40, 90))


def _lmm_config(tmp_path, **extra):
    return {**shipped_defaults("PRIME"), "ranker_model": "small", "seed": 3, "reproducibility": True,
            "ranker_small": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
            "image_min_pixels": 784, "image_max_pixels": 784, "ranker_quantization": "none",
            "artifacts_dir": str(tmp_path / "art"), **extra}


def _lora(backbone):
    return {n: p.detach().clone() for n, p in backbone.model.named_parameters() if "lora_" in n}


def test_build_backbone_builds_small_reseeds_and_places_by_one_rule(tmp_path):
    from recbole_mm.lmm.backbone import Backbone, build_backbone, place

    config = _lmm_config(tmp_path, lora_r=4)
    first = build_backbone(config, _Store(), "cpu")
    (folder,) = os.listdir(config["artifacts_dir"])
    assert folder.startswith("small-vlm-") and first.is_vision and not first.quantized
    assert first.settings.lora_r == 4 and first.settings.min_pixels == 784
    torch.rand(100)  # whatever ran before (stage 1, another build), LoRA starts from the same weights
    second = build_backbone(config, _Store(), "cpu")
    a, b = _lora(first), _lora(second)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert os.listdir(config["artifacts_dir"]) == [folder]  # built once, reused
    assert {p.device.type for p in second.model.parameters()} == {"cpu"}

    moved = []

    class Model:
        def to(self, device):
            moved.append(device)

    place(Backbone(Model(), None, None, False, 0.0, quantized=True), "cuda:0")
    place(Backbone(Model(), None, None, False, 0.0, quantized=False), "cuda:1")
    assert moved == ["cuda:1"]  # a 4-bit model stays where bitsandbytes' device_map put it


class _RolePlayTemplate:
    """A different prompt (MLLM4Rec-like role play, ``title : caption`` lines), numbered by letters."""

    def __init__(self):
        from recbole_mm.lmm.prompts import PromptSettings

        self.settings = PromptSettings(variant="no_image")
        self.use_images = False

    def labels(self, k):
        return list("ABCDEFGH"[:k])

    def render(self, history, candidates, tokenizer=None):
        from recbole_mm.lmm.prompts import Prompt

        lines = ["You are a movie fan. You watched:"]
        lines += [f"{h['attributes']['title']} : {h['attributes']['caption']}" for h in history]
        lines += ["Which one next?"] + [f"{lab}. {c['attributes']['title']} : {c['attributes']['caption']}"
                                        for lab, c in zip(self.labels(len(candidates)), candidates)]
        text = "\n".join(lines) + "\n"
        return Prompt(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}], images=[],
                      letters=self.labels(len(candidates)), parts=[text])

    def response(self, label, tokenizer):
        return label + tokenizer.eos_token

    def response_tokens(self, prompt_text, full_text, tokenizer):
        return 2


def test_lmm_ranker_takes_any_template_and_scores_in_batches(tmp_path):
    from recbole_mm.lmm.backbone import build_backbone
    from recbole_mm.lmm.candidate_ranker import LMMRanker
    from recbole_mm.lmm.prompts import LetteredJSONTemplate, PromptTemplate

    backbone = build_backbone(_lmm_config(tmp_path, lora_r=0), _Store(), "cpu")
    backbone.model.eval()
    template = _RolePlayTemplate()
    assert isinstance(template, PromptTemplate) and isinstance(LetteredJSONTemplate(), PromptTemplate)
    ranker = LMMRanker(backbone, _Store(), template)
    histories = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    candidates = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 1, 2]])
    text, images = ranker.render(histories[0], candidates[0].tolist())
    assert "You are a movie fan" in text and "A. movie 3 red blue : a poster of movie 3" in text and images == []
    with torch.no_grad():
        batched = ranker.score_in_batches(histories, candidates, 3)
        # independent reference: each prompt alone, the last position's logits at the labels' tokens
        for row in range(4):
            text, _ = ranker.render(histories[row], candidates[row].tolist())
            ids = backbone.tokenizer(text, return_tensors="pt")
            logits = backbone.model(**ids).logits[0, -1]
            label_ids = [backbone.tokenizer(text + lab, add_special_tokens=False)["input_ids"][-1] for lab in "ABC"]
            torch.testing.assert_close(batched[row], logits[label_ids], rtol=1e-4, atol=1e-4)
        for bs in (1, None):
            torch.testing.assert_close(ranker.score_in_batches(histories, candidates, bs), batched, rtol=1e-4, atol=1e-4)
        assert ranker.score_in_batches([], candidates[:0], 2).shape == (0, 3)
        loss = ranker.loss(histories, candidates, torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(loss)


def test_the_retriever_shares_data_protocol_and_device_settings_by_rule(tiny_dataset):
    from recbole_mm.model.prime import retriever_config, shared_keys

    before = {"data_path", "load_col", "unload_col", "MAX_ITEM_LIST_LENGTH", "USER_ID_FIELD", "ITEM_ID_FIELD",
              "TIME_FIELD", "user_inter_num_interval", "item_inter_num_interval", "filter_inter_by_user_or_item",
              "rm_dup_inter", "val_interval", "seed", "reproducibility", "mask_history", "metrics", "topk",
              "valid_metric", "eval_batch_size", "checkpoint_dir", "show_progress", "state", "use_gpu", "gpu_id",
              "benchmark_filename"}  # the hand-kept list this rule replaces
    assert before <= shared_keys()
    assert not shared_keys() & {"epochs", "learning_rate", "train_batch_size", "hidden_size", "lora_r", "n_candidates"}
    data_path, name = tiny_dataset
    split = {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"}
    config = Config("PRIME", name, config_dict=tiny_config(data_path, eval_args=split, learning_rate=0.5, seed=7,
                                                           retriever_config={"learning_rate": 0.01}))
    rconf = retriever_config(config)
    assert rconf["eval_args"]["order"] == "TO" and rconf["seed"] == 7  # the same split and seed as PRIME's
    # training settings of the host run stay the host's: the retriever's come from its yaml and retriever_config
    assert rconf["learning_rate"] == 0.01 and "epochs" not in rconf.external_config_dict
