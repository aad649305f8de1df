"""Candidate scores as title log-likelihoods: ``log p(title tokens | prompt)`` under a causal LM,
every candidate of a prompt in one batched pass that shares the prompt (HaNoRec's ranker).

How the prompt is shared: the prompt runs ONCE (``use_cache=True``), its key/value cache is
repeated over the k candidates (``DynamicCache.batch_repeat_interleave``) and one batched pass
runs the k titles (right-padded) on top of it. The first title token's log-probability comes from
the prompt pass's last position, the others from the title pass. A padded batch of k copies of
``prompt + title`` would compute the prompt k times; prompts are hundreds of tokens and titles
about ten, so the cache is about k times cheaper, and it is differentiable (the cache tensors carry
the graph), so training uses the same path. Gradient checkpointing turns the cache off in
transformers and is therefore refused here.
"""

from __future__ import annotations

from logging import getLogger

import torch

from recbole_mm.lmm.prompts import TitleListTemplate

logger = getLogger(__name__)


def _cache_argument(model) -> str:
    """The name under which the model's forward takes a key/value cache (``cache`` in transformers
    >= 5.2x, ``past_key_values`` before)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class TitleScorer:
    """Scores candidate items by the log-likelihood of their title after a prompt.

    ``backbone``: a text causal LM from :func:`recbole_mm.lmm.backbone.build_backbone` (its
    ``model`` may be a peft model); ``store``: the dataset's item store; ``template``: a
    :class:`~recbole_mm.lmm.prompts.TitleListTemplate`. ``normalise``: the score is the mean
    log-probability per title token instead of the sum. Histories are lists of internal item ids
    (oldest first), candidates a LongTensor (n, k). ``score_in_batches`` has
    :class:`~recbole_mm.lmm.candidate_ranker.LMMRanker`'s signature, so PRIME's two-stage
    composition takes this scorer unchanged.
    """

    def __init__(self, backbone, store, template: TitleListTemplate, device="cpu", normalise: bool = False):
        from recbole_mm.errors import ConfigError

        if getattr(backbone.settings, "gradient_checkpointing", False):
            raise ConfigError("gradient_checkpointing=True: the title scorer shares each prompt through the key/value "
                              "cache, which checkpointing turns off; set gradient_checkpointing: False")
        self.backbone, self.store, self.template, self.device = backbone, store, template, device
        self.tokenizer = backbone.tokenizer
        self.normalise = normalise
        self._titles: dict[int, list[int]] = {}
        self._cache_arg = _cache_argument(self.model)

    @property
    def model(self):
        return self.backbone.model

    def _item(self, item_id: int) -> dict:
        return {"attributes": self.store.attributes(item_id), "image": None}

    def title_ids(self, item_id: int) -> list[int]:
        """Token ids of the item's answer (its title as the template writes it), cached."""
        if item_id not in self._titles:
            text = self.template.response(self.template.title(self._item(item_id), self.tokenizer), self.tokenizer)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._titles[item_id] = ids or [self.tokenizer.pad_token_id]
        return self._titles[item_id]

    def prompt_text(self, history: list[int], candidates: list[int]) -> str:
        """The rendered prompt with the chat template's assistant opening (plain text + newline
        for a tokenizer without a chat template)."""
        prompt = self.template.render([self._item(i) for i in history], [self._item(i) for i in candidates],
                                      self.tokenizer)
        text = prompt.text_only()
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=False)
        return text + "\n"

    def prompt_ids(self, history: list[int], candidates: list[int]) -> list[int]:
        return self.tokenizer(self.prompt_text(history, candidates), add_special_tokens=False)["input_ids"]

    def log_likelihoods(self, prompt: list[int], titles: list[list[int]]) -> torch.Tensor:
        """``(sum log p, token count)`` of each title after ``prompt``: two (k,) tensors; the sums
        keep the graph when the model is trained."""
        k, device = len(titles), self.device
        out = self.model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        cache = getattr(out, self._cache_arg)
        lengths = torch.tensor([len(t) for t in titles], device=device)
        width = int(lengths.max())
        ids = torch.full((k, width), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        for r, t in enumerate(titles):
            ids[r, :len(t)] = torch.tensor(t, device=device)
        total = first[ids[:, 0]]
        if width > 1:
            cache.batch_repeat_interleave(k)
            positions = torch.arange(len(prompt), len(prompt) + width - 1, device=device).expand(k, -1)
            mask = torch.ones((k, len(prompt) + width - 1), dtype=torch.long, device=device)
            rest = self.model(input_ids=ids[:, :-1], attention_mask=mask, position_ids=positions, use_cache=True,
                              **{self._cache_arg: cache})
            logp = torch.log_softmax(rest.logits.float(), dim=-1).gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
            inside = torch.arange(1, width, device=device).unsqueeze(0) < lengths.unsqueeze(1)
            total = total + (logp * inside).sum(1)
        return total, lengths

    def candidate_log_likelihoods(self, histories: list[list[int]], candidates: torch.Tensor,
                                  scored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sums, lengths)`` (n, m) for each row's prompt (history + all its ``candidates``) and the
        titles of ``scored`` (n, m) items (default: every candidate)."""
        scored = candidates if scored is None else scored
        sums, lengths = [], []
        for history, cands, wanted in zip(histories, candidates.tolist(), scored.tolist()):
            s, n = self.log_likelihoods(self.prompt_ids(history, cands), [self.title_ids(i) for i in wanted])
            sums.append(s)
            lengths.append(n)
        return torch.stack(sums), torch.stack(lengths)

    def score(self, histories: list[list[int]], candidates: torch.Tensor) -> torch.Tensor:
        """(n, k) scores: sum (``normalise``: per-token mean) of each candidate title's log-probabilities."""
        sums, lengths = self.candidate_log_likelihoods(histories, candidates)
        return sums / lengths if self.normalise else sums

    @torch.no_grad()
    def score_in_batches(self, histories: list[list[int]], candidates: torch.Tensor, batch_size: int | None = None,
                         ) -> torch.Tensor:
        """:meth:`score` of every row, as CPU floats ((0, k) for no rows). Each prompt is its own pass
        (``batch_size`` is accepted for :class:`LMMRanker`'s signature). The caller sets eval mode."""
        n, k = len(histories), candidates.size(1)
        if n == 0:
            return torch.zeros(0, k)
        return self.score(histories, candidates.cpu()).float().cpu()

    def nll(self, histories: list[list[int]], candidates: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """SFT loss: mean negative log-likelihood per answer-title token over the batch (as a causal
        LM's loss on the response tokens)."""
        sums, lengths = self.candidate_log_likelihoods(histories, candidates, answers.view(-1, 1))
        return -sums.sum() / lengths.sum()

    def loss(self, histories: list[list[int]], candidates: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
        """:meth:`nll` of each row's answer (``candidates[row, answer_pos]``), the signature of
        :meth:`LMMRanker.loss` that PRIME's ranker stage trains through."""
        answers = candidates.gather(1, answer_pos.view(-1, 1).long()).view(-1)
        return self.nll(histories, candidates, answers)
