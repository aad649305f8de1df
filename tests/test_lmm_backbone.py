"""Backbone loading (vision-language / text-only, 4-bit, LoRA) and the small local model builder.

All models are tiny and built locally (no hub, no download)."""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from recbole_mm.lmm.backbone import (  # noqa: E402
    BackboneLoadError, BackboneSettings, language_linear_names, load_backbone)
from recbole_mm.lmm.tiny_models import MARKER, build_tiny_causal_lm, build_tiny_vlm  # noqa: E402

TITLES = [
    "Red matte lipstick, long lasting", "Waterproof black eyeliner pencil", "Vitamin C face serum 30 ml",
    "Ionic hair dryer 1800 W", "Rose scented body lotion", "Mineral sunscreen SPF 50",
    "Nail polish set, 12 colours", "Argan oil shampoo for dry hair",
] * 3

VISION_WORDS = ("visual", "vision", "merger", "lm_head", "projector")
SMALL = dict(hidden_size=64, num_layers=1, num_heads=4, vocab_size=500, vision_depth=1, vision_embed_dim=32)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm(str(tmp_path_factory.mktemp("lmm") / "small-vlm"), TITLES, **SMALL)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_tiny_causal_lm(str(tmp_path_factory.mktemp("lmm") / "small-lm"), TITLES,
                                 hidden_size=32, num_layers=1, num_heads=2, vocab_size=500)


def _image(color="red", size=(40, 30)):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).ellipse([4, 4, size[0] - 4, size[1] - 4], fill=color)
    return img


def _messages(img):
    return [{"role": "user", "content": [
        {"type": "text", "text": "History: "}, {"type": "image", "image": img},
        {"type": "text", "text": "Red matte lipstick. Candidates: (A) serum (B) eyeliner. Answer:"}]}]


def _lora_names(model):
    return [n for n, _ in model.named_modules() if n.endswith("lora_A")]


def _check_lora_and_grads(backbone, img):
    model = backbone.model
    lora = _lora_names(model)
    assert lora, "no LoRA modules"
    assert all("language_model" in n for n in lora)
    assert not any(w in n for n in lora for w in VISION_WORDS)
    assert 0 < backbone.trainable_share < 0.2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    inputs = backbone.processor.apply_chat_template(_messages(img), add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
    image_id = model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) >= 1 and "pixel_values" in inputs
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    # LoRA B starts at zero, so B gets a nonzero gradient
    assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    return out


def test_import_is_light():
    code = ("import sys, recbole_mm.lmm; bad = [m for m in ('transformers', 'peft', 'bitsandbytes') "
            "if m in sys.modules]; assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_small_vlm_folder_layout(vlm_dir):
    import json

    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(vlm_dir)
    assert config.model_type == "qwen2_vl"
    tok = AutoTokenizer.from_pretrained(vlm_dir)
    for name, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert getattr(config, name) == tok.convert_tokens_to_ids(token)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert config.text_config.vocab_size >= len(tok)
    # trained on the titles: a frequent word is a single token
    assert len(tok("lipstick", add_special_tokens=False)["input_ids"]) < len("lipstick")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text
    meta = json.load(open(os.path.join(vlm_dir, MARKER)))
    assert meta["arguments"]["hidden_size"] == 64 and len(meta["texts_fingerprint"]) == 64


def test_load_small_vlm_lora(vlm_dir):
    backbone = load_backbone(BackboneSettings(name_or_path=vlm_dir, quantization="none"))
    assert backbone.is_vision and backbone.processor is not None
    assert backbone.tokenizer is backbone.processor.tokenizer
    assert next(backbone.model.parameters()).dtype == torch.float32  # CPU default
    assert not backbone.quantized
    # every language-model linear layer is a target (7 per decoder layer), nothing else
    assert len(backbone.lora_targets) == 7 * SMALL["num_layers"]
    torch.manual_seed(0)
    _check_lora_and_grads(backbone, _image())
    # the text-only forward (no image) works too
    enc = backbone.processor(text=["Red matte lipstick"], return_tensors="pt")
    assert backbone.model(**enc).logits.shape[:2] == enc["input_ids"].shape


def test_load_small_vlm_4bit(vlm_dir):
    import bitsandbytes as bnb

    backbone = load_backbone(BackboneSettings(name_or_path=vlm_dir, quantization="4bit"))
    assert backbone.quantized
    q4 = [n for n, m in backbone.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any("language_model" in n and "q_proj" in n for n in q4)
    assert not any("lm_head" in n for n in q4)
    assert len(backbone.lora_targets) == 7 * SMALL["num_layers"]
    torch.manual_seed(0)
    _check_lora_and_grads(backbone, _image("blue"))


def test_lora_target_suffixes_and_pixel_limits(vlm_dir):
    backbone = load_backbone(BackboneSettings(name_or_path=vlm_dir, quantization="none",
                                              lora_targets=["q_proj", "v_proj"],
                                              min_pixels=28 * 28, max_pixels=56 * 56))
    targets = backbone.lora_targets
    assert targets and all(t.endswith((".q_proj", ".v_proj")) for t in targets)
    assert len(targets) == 2 * SMALL["num_layers"]
    assert all("language_model" in n for n in _lora_names(backbone.model))
    # max_pixels = 56x56 -> at most 4 image tokens after the 2x2 merge, even for a big image
    enc = backbone.processor(text=["<|vision_start|><|image_pad|><|vision_end|>x"], images=[_image(size=(200, 160))],
                             return_tensors="pt")
    n_image = int((enc["input_ids"] == backbone.model.config.image_token_id).sum())
    assert 1 <= n_image <= 4


def test_language_linear_names_exclude_vision(vlm_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    names = language_linear_names(model)
    all_linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any("visual" in n for n in all_linear) and any("lm_head" in n for n in all_linear)
    assert set(names) == {n for n in all_linear if "language_model" in n}


def test_small_causal_lm(lm_dir):
    backbone = load_backbone(BackboneSettings(name_or_path=lm_dir, quantization="none"))
    assert not backbone.is_vision and backbone.processor is None
    assert all(not n.endswith("lm_head") for n in backbone.lora_targets)
    assert len(backbone.lora_targets) == 7
    assert 0 < backbone.trainable_share < 0.5
    text = backbone.tokenizer.apply_chat_template([{"role": "user", "content": "lipstick?"}],
                                                  add_generation_prompt=True, tokenize=False)
    enc = backbone.tokenizer([text], return_tensors="pt")
    out = backbone.model(**enc, labels=enc["input_ids"])
    out.loss.backward()
    assert all("lora_" in n for n, p in backbone.model.named_parameters() if p.grad is not None)


def test_build_reuses_cache(tmp_path, monkeypatch):
    import recbole_mm.lmm.tiny_models as small

    out = str(tmp_path / "vlm")
    kwargs = dict(hidden_size=32, num_layers=1, num_heads=2, vocab_size=400, vision_embed_dim=32)
    path = build_tiny_vlm(out, TITLES[:5], **kwargs)
    weights = os.path.join(path, "model.safetensors")
    marker = os.path.join(path, MARKER)
    stamp = (os.stat(weights).st_mtime_ns, os.stat(marker).st_mtime_ns)

    def no_rebuild(*args, **kw):
        raise AssertionError("rebuilt although the folder holds this build")

    with monkeypatch.context() as m:
        m.setattr(small, "train_tokenizer", no_rebuild)
        assert build_tiny_vlm(out, TITLES[:5], **kwargs) == path
    assert (os.stat(weights).st_mtime_ns, os.stat(marker).st_mtime_ns) == stamp
    # no temporary folders left beside it
    assert os.listdir(tmp_path) == ["vlm"]
    # other texts -> rebuilt in place
    import json

    old = json.load(open(marker))["texts_fingerprint"]
    assert build_tiny_vlm(out, TITLES[:6], **kwargs) == path
    assert json.load(open(marker))["texts_fingerprint"] != old
    assert sorted(os.listdir(tmp_path)) == ["vlm"]
    # an incomplete folder (no marker) is rebuilt, not trusted
    os.remove(marker)
    build_tiny_vlm(out, TITLES[:6], **kwargs)
    assert os.path.isfile(marker)


def test_build_is_seeded(tmp_path):
    from safetensors.torch import load_file

    kwargs = dict(hidden_size=32, num_layers=1, num_heads=2, vocab_size=400, vision_embed_dim=32)
    a = load_file(os.path.join(build_tiny_vlm(str(tmp_path / "a"), TITLES[:5], seed=3, **kwargs), "model.safetensors"))
    b = load_file(os.path.join(build_tiny_vlm(str(tmp_path / "b"), TITLES[:5], seed=3, **kwargs), "model.safetensors"))
    c = load_file(os.path.join(build_tiny_vlm(str(tmp_path / "c"), TITLES[:5], seed=4, **kwargs), "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 100)


def test_unreachable_hub_id_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "no-such-org/no-such-model-recbole-mm"
    with pytest.raises(BackboneLoadError) as info:
        load_backbone(BackboneSettings(name_or_path=name))
    msg = str(info.value)
    assert name in msg and "small" in msg and "local" in msg
    assert isinstance(info.value, OSError)


def test_missing_local_dir_error(tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(BackboneLoadError) as info:
        load_backbone(BackboneSettings(name_or_path=missing))
    assert missing in str(info.value) and "ranker_model: small" in str(info.value)


def test_settings_validation():
    with pytest.raises(ValueError):
        BackboneSettings(name_or_path="x", quantization="8bit")
    with pytest.raises(ValueError):
        BackboneSettings(name_or_path="x", dtype="int8")
    s = BackboneSettings(name_or_path="x")
    assert (s.trust_remote_code, s.lora_r, s.lora_alpha, s.lora_dropout) == (False, 8, 16, 0.05)


@pytest.mark.parametrize("trust", [None, True])
def test_trust_remote_code_passed(vlm_dir, monkeypatch, trust):
    import transformers

    calls = []

    def recorder(cls_name):
        original = getattr(transformers, cls_name).from_pretrained

        def wrapped(*args, **kwargs):
            calls.append((cls_name, kwargs.get("trust_remote_code", "missing")))
            return original(*args, **kwargs)
        return staticmethod(wrapped)

    for cls_name in ("AutoConfig", "AutoModelForImageTextToText", "AutoProcessor"):
        monkeypatch.setattr(getattr(transformers, cls_name), "from_pretrained", recorder(cls_name))
    settings = BackboneSettings(name_or_path=vlm_dir, quantization="none", lora_r=0)
    if trust is not None:
        settings.trust_remote_code = trust
    backbone = load_backbone(settings)
    assert backbone.trainable_share == 0.0  # lora_r=0: frozen
    expected = bool(trust)
    assert {c[0] for c in calls} >= {"AutoConfig", "AutoModelForImageTextToText", "AutoProcessor"}
    assert all(value is expected for _, value in calls), calls
