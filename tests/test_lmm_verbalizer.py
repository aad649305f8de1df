"""PRIME's verbalizer on a tiny locally built Qwen2-VL-architecture model."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from recbole_mm.lmm.backbone import BackboneSettings, load_backbone  # noqa: E402
from recbole_mm.lmm.tiny_models import build_tiny_vlm  # noqa: E402
from recbole_mm.lmm.prompts import index_letters  # noqa: E402
from recbole_mm.lmm.verbalizer import (  # noqa: E402
    VerbalizerError, end_of_turn_token, last_positions, letter_labels, letter_token_ids, response_text,
    score_candidates)

TITLES = ["Red matte lipstick", "Waterproof eyeliner", "Vitamin C serum", "Ionic hair dryer",
          "Rose body lotion", "Sunscreen SPF 50"] * 3


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = build_tiny_vlm(str(tmp_path_factory.mktemp("verb") / "vlm"), TITLES, hidden_size=64, num_layers=1,
                           num_heads=4, vocab_size=500, vision_embed_dim=32, seed=1)
    bb = load_backbone(BackboneSettings(name_or_path=path, quantization="none", lora_r=0))
    bb.model.eval()
    return bb


def _image(color):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (36, 30), "white")
    ImageDraw.Draw(img).rectangle([3, 3, 25, 20], fill=color)
    return img


def _prompt(backbone, history, candidates):
    content = [{"type": "text", "text": f"History: {history}\n"}]
    for letter, (title, _) in zip(index_letters(len(candidates)), candidates):
        content += [{"type": "text", "text": f"({letter}) "}, {"type": "image"}, {"type": "text", "text": f" {title}\n"}]
    content.append({"type": "text", "text": "Answer with the letter of the best candidate."})
    text = backbone.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
    return text, [img for _, img in candidates]


def _two_prompts(backbone):
    short = _prompt(backbone, "lipstick", [("serum", _image("red")), ("dryer", _image("blue")),
                                           ("lotion", _image("green"))])
    long = _prompt(backbone, "lipstick, eyeliner, sunscreen, vitamin serum, rose body lotion, hair dryer",
                   [("eyeliner", _image("black")), ("sunscreen", _image("yellow")), ("lipstick", _image("pink"))])
    return [short, long]


def _encode(backbone, prompts, side):
    tok = backbone.processor.tokenizer
    old, tok.padding_side = tok.padding_side, side
    try:
        return backbone.processor(text=[t for t, _ in prompts], images=[i for _, imgs in prompts for i in imgs],
                                  padding=True, return_tensors="pt")
    finally:
        tok.padding_side = old


def test_index_letters():
    assert index_letters(3) == ["A", "B", "C"]
    assert index_letters(26)[-1] == "Z" and len(index_letters(25)) == 25
    for bad in (0, 27):
        with pytest.raises(ValueError):
            index_letters(bad)


def test_letter_token_ids_match_full_tokenization(backbone):
    tok = backbone.tokenizer
    text, _ = _two_prompts(backbone)[0]
    letters = index_letters(25)
    ids = letter_token_ids(tok, text, letters)
    base = tok(text, add_special_tokens=False)["input_ids"]
    assert len(set(ids)) == 25
    for letter, i in zip(letters, ids):
        full = tok(text + letter, add_special_tokens=False)["input_ids"]
        assert full[:len(base)] == base and full[len(base):] == [i]
        assert tok.decode([i]) == letter
    # the response tokens used in training start with the same letter id
    full = tok(text + response_text(tok, "C"), add_special_tokens=False)["input_ids"]
    assert full[len(base):] == [ids[2], tok.convert_tokens_to_ids("<|im_end|>")]


class _MergingTokenizer:
    """A toy tokenizer that merges a space with the following capital letter (like many BPEs)."""

    vocab = {" ": 1, "x": 2, " A": 3, " B": 4, "A": 5, "B": 6, "1": 7}

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text[i] == " " and i + 1 < len(text) and text[i + 1] in "AB":
                ids.append(self.vocab[text[i:i + 2]])
                i += 2
            else:
                ids.append(self.vocab[text[i]])
                i += 1
        return {"input_ids": ids}

    def convert_ids_to_tokens(self, i):
        return {v: k for k, v in self.vocab.items()}[i]


def test_letter_token_ids_merge_and_error():
    tok = _MergingTokenizer()
    # the prompt ends with a space: the letter merges with it -> the merged token is the letter's id
    assert letter_token_ids(tok, "xx ", ["A", "B"]) == [3, 4]
    assert letter_token_ids(tok, "xx", ["A", "B"]) == [5, 6]
    with pytest.raises(VerbalizerError, match="'A1'"):
        letter_token_ids(tok, "xx", ["A1"])


def test_letter_token_ids_error_on_real_tokenizer(backbone):
    text, _ = _two_prompts(backbone)[0]
    with pytest.raises(VerbalizerError, match="'B7'"):
        letter_token_ids(backbone.tokenizer, text, ["A", "B7"])  # digits are split off: two tokens


def test_last_positions():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_positions(right).tolist() == [2, 4]
    assert last_positions(left).tolist() == [4, 4]


@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_equal_unbatched_logits(backbone, side):
    model, proc = backbone.model, backbone.processor
    prompts = _two_prompts(backbone)
    letter_ids = letter_token_ids(backbone.tokenizer, prompts[0][0], index_letters(3))
    batch = _encode(backbone, prompts, side)
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] < lengths[1]  # really padded
    with torch.no_grad():
        scores = score_candidates(model, batch, letter_ids)
        assert scores.shape == (2, 3)
        for row, (text, imgs) in enumerate(prompts):
            single = proc(text=[text], images=imgs, return_tensors="pt")
            expected = model(**single).logits[:, -1, letter_ids][0]
            torch.testing.assert_close(scores[row], expected, rtol=1e-4, atol=1e-5)
        naive = model(**batch).logits[:, -1, letter_ids]
        if side == "right":  # the naive last column of the short row is a padding position
            assert not torch.allclose(naive[0], scores[0], atol=1e-4)
        torch.testing.assert_close(naive[1], scores[1], rtol=1e-4, atol=1e-5)


def test_scores_without_logits_to_keep(backbone):
    """A model whose forward has no logits_to_keep gets the full logits path: same scores."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            assert "logits_to_keep" not in kwargs
            return self.inner(**kwargs)

    prompts = _two_prompts(backbone)
    letter_ids = torch.tensor(letter_token_ids(backbone.tokenizer, prompts[0][0], index_letters(3)))
    batch = _encode(backbone, prompts, "right")
    with torch.no_grad():
        a = score_candidates(backbone.model, batch, letter_ids)
        b = score_candidates(Wrapper(backbone.model), batch, letter_ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_letter_labels(backbone, side):
    tok, model = backbone.tokenizer, backbone.model
    assert end_of_turn_token(tok) == "<|im_end|>"
    eot_id = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = _two_prompts(backbone)
    letter_ids = letter_token_ids(tok, prompts[0][0], index_letters(3))
    answers = ["B", "C"]
    texts = [(t + response_text(tok, a), imgs) for (t, imgs), a in zip(prompts, answers)]
    batch = _encode(backbone, texts, side)
    labels = letter_labels(batch["input_ids"], batch["attention_mask"])
    for row, answer in enumerate(answers):
        kept = labels[row][labels[row] != -100].tolist()
        assert kept == [letter_ids["ABC".index(answer)], eot_id]
        # every prompt token (and padding) is masked: the kept tokens are the row's last real ones
        positions = (labels[row] != -100).nonzero().flatten().tolist()
        last = int(last_positions(batch["attention_mask"])[row])
        assert positions == [last - 1, last]
    # the model's loss with these labels is the CE of exactly those two tokens
    with torch.no_grad():
        out = model(**batch, labels=labels)
        logits = out.logits.float()
        manual = []
        for row in range(2):
            for pos in (labels[row] != -100).nonzero().flatten().tolist():
                manual.append(torch.nn.functional.cross_entropy(logits[row, pos - 1][None], labels[row, pos][None]))
        torch.testing.assert_close(out.loss, torch.stack(manual).mean(), rtol=1e-4, atol=1e-5)
