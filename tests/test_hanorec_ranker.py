"""HaNoRec's ranker parts: the title log-likelihood scorer (against plain per-candidate forward passes),
NoDO's LoRA noise (policy only, never the reference, off in eval, weights unchanged), the template."""

import pytest
import torch


class _Store:
    """Items with a title each (what TitleScorer reads)."""

    def attributes(self, item_id):
        names = ["", "The Matrix (1999)", "Up (2009)", "Men in Black (1997)", "Mad Max (1979)",
                 "Titanic (1997)", "Flipped (2010)", "Roman Holiday (1953)", "Godfather, The (1972)"]
        return {"title": names[item_id]}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from recbole_mm.lmm.backbone import BackboneSettings, load_backbone
    from recbole_mm.lmm.tiny_models import build_tiny_causal_lm

    store = _Store()
    texts = [store.attributes(i)["title"] for i in range(1, 9)] + ["The user has watched the following movies:"]
    folder = build_tiny_causal_lm(str(tmp_path_factory.mktemp("lm") / "lm"), texts, hidden_size=32, num_layers=2,
                                  num_heads=2, vocab_size=400, seed=3)
    torch.manual_seed(0)
    bb = load_backbone(BackboneSettings(name_or_path=folder, quantization="none", dtype="float32", lora_r=4,
                                        lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():  # LoRA's B starts at 0: give the adapter an effect so that noise on A shows
        for n, p in bb.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return bb


def _scorer(backbone, normalise=False):
    from recbole_mm.lmm.prompts import PromptSettings, TitleListTemplate
    from recbole_mm.lmm.title_scorer import TitleScorer

    template = TitleListTemplate(PromptSettings(max_history=5, attr_max_tokens=16, variant="title_only", domain="movie"))
    return TitleScorer(backbone, _Store(), template, normalise=normalise)


def _reference(model, prompt, title):
    """Independent reference: one plain forward pass over prompt + title, sum of the title's log-probs."""
    ids = torch.tensor([prompt + title])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(title))


def test_shared_prompt_scores_equal_plain_forward_passes(backbone):
    scorer = _scorer(backbone)
    backbone.model.eval()
    histories = [[1, 2, 3], [4]]
    candidates = torch.tensor([[5, 6, 7, 8], [2, 8, 1, 3]])
    with torch.no_grad():
        scores = scorer.score(histories, candidates)
        for r, (h, c) in enumerate(zip(histories, candidates.tolist())):
            prompt = scorer.prompt_ids(h, c)
            for j, item in enumerate(c):
                assert float(scores[r, j]) == pytest.approx(_reference(backbone.model, prompt, scorer.title_ids(item)),
                                                            abs=1e-4)
        lengths = torch.tensor([[len(scorer.title_ids(i)) for i in row] for row in candidates.tolist()])
        assert len({len(scorer.title_ids(i)) for i in range(1, 9)}) > 1  # titles of different lengths (padding)
        mean = _scorer(backbone, normalise=True).score(histories, candidates)
        assert torch.allclose(mean, scores / lengths, atol=1e-5)
        assert scorer.score_in_batches(histories, candidates).shape == (2, 4)


def test_sft_loss_is_the_answer_titles_token_mean_nll(backbone):
    scorer = _scorer(backbone)
    backbone.model.eval()
    candidates = torch.tensor([[5, 6, 7], [1, 2, 3]])
    answers = torch.tensor([6, 3])
    with torch.no_grad():
        loss = scorer.nll([[1, 2], [4]], candidates, answers)
        sums, n = 0.0, 0
        for h, c, a in zip([[1, 2], [4]], candidates.tolist(), answers.tolist()):
            sums += _reference(backbone.model, scorer.prompt_ids(h, c), scorer.title_ids(a))
            n += len(scorer.title_ids(a))
    assert float(loss) == pytest.approx(-sums / n, abs=1e-5)
    backbone.model.train()
    scorer.nll([[1, 2]], candidates[:1], answers[:1]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in backbone.model.named_parameters()
               if "lora_" in n)
    backbone.model.zero_grad(set_to_none=True)


def test_nodo_perturbs_the_policy_only_and_restores_the_weights(backbone):
    from recbole_mm.lmm.nodo import lora_noise, lora_pairs

    model = backbone.model
    model.eval()
    ids = torch.tensor([[5, 9, 11, 20, 33]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        with lora_noise(model, 0.1, torch.Generator().manual_seed(0)) as pairs:
            noisy = model(input_ids=ids).logits
            # the reference pass inside the same block is not perturbed (adapters disabled)
            with model.disable_adapter():
                reference_inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert len(pairs) == len(lora_pairs(model)) > 0
    assert not torch.allclose(noisy, clean, atol=1e-4)            # the policy output changes
    assert torch.equal(reference_inside, reference)                # the reference: bit-identical
    assert torch.equal(after, clean)                               # nothing stays behind
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n                        # weights exactly as before
    with lora_noise(model, 0.0):                                   # sigma 0 = off
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, clean)


def test_nodo_equals_a_pass_with_perturbed_factors(backbone):
    """The hooks give the same output as writing A + eps_A and B + eps_B into the weights."""
    from recbole_mm.lmm.nodo import lora_noise, lora_pairs

    model = backbone.model
    model.eval()
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        with lora_noise(model, 0.05, torch.Generator().manual_seed(1)):
            hooked = model(input_ids=ids).logits
        generator = torch.Generator().manual_seed(1)
        saved = []
        for _, a, b in lora_pairs(model):
            for m in (a, b):
                saved.append((m, m.weight.detach().clone()))
                m.weight.add_(torch.randn(m.weight.shape, generator=generator) * 0.05)
        written = model(input_ids=ids).logits
        for m, w in saved:
            m.weight.copy_(w)
    assert torch.allclose(hooked, written, atol=1e-5)


def test_title_list_template_quotes_titles_and_answers_with_the_title():
    from recbole_mm.lmm.prompts import PromptSettings, PromptTemplate, TitleListTemplate

    t = TitleListTemplate(PromptSettings(max_history=2, attr_max_tokens=None, variant="title_only", domain="movie"))
    assert isinstance(t, PromptTemplate)
    items = [{"attributes": {"title": f"T{i}\nline"}} for i in range(4)]
    text = t.render(items[:3], items[3:] + [{"attributes": {}}]).text_only()
    assert text.splitlines() == ["The user has watched the following movies:", '"T1 line"', '"T2 line"', "",
                                 "Please write a movie that the user may watch. Below are the candidate movies:",
                                 '"T3 line"', '"(untitled)"']
    assert t.response("Up (2009)", None) == "Up (2009)"
