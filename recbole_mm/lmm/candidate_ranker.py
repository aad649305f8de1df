"""An LMM that ranks candidate items: prompt template -> one forward pass -> label logits (verbalizer)."""

from __future__ import annotations

from logging import getLogger

import torch

from recbole_mm.lmm.prompts import LetteredJSONTemplate, PromptSettings, PromptTemplate
from recbole_mm.lmm.verbalizer import letter_labels, letter_token_ids, score_candidates

logger = getLogger(__name__)


class LMMRanker:
    """Scores candidate items with an LMM: builds prompts from item ids through a prompt template,
    scores candidates from one forward pass, computes the training loss.

    ``backbone`` comes from :func:`recbole_mm.lmm.backbone.build_backbone` (or ``load_backbone``);
    ``store`` is the dataset's :class:`~recbole_mm.data.item_store.ItemStore`; ``template`` a
    :class:`~recbole_mm.lmm.prompts.PromptTemplate` (PRIME's :class:`LetteredJSONTemplate`; a bare
    :class:`PromptSettings` is taken as that template with those settings). Histories are lists of
    internal item ids (oldest first); candidates a LongTensor (batch, k). Images are used only when
    the backbone is a vision-language model and the template shows them.
    """

    def __init__(self, backbone, store, template: PromptTemplate | PromptSettings, device="cpu",
                 loss_newline: bool | None = None):
        if isinstance(template, PromptSettings):
            template = LetteredJSONTemplate(template, loss_newline=bool(loss_newline))
        elif loss_newline is not None:
            raise TypeError("loss_newline belongs to the template (LetteredJSONTemplate(settings, loss_newline=...))")
        self.backbone, self.store, self.template, self.device = backbone, store, template, device
        self.tokenizer = backbone.tokenizer
        self.use_images = backbone.is_vision and template.use_images
        self._label_ids: dict[int, torch.Tensor] = {}

    @property
    def model(self):
        return self.backbone.model

    @property
    def settings(self) -> PromptSettings:
        return self.template.settings

    @property
    def loss_newline(self) -> bool:
        """Whether the response also holds a newline after the end-of-turn token (PRIME's template)."""
        return bool(getattr(self.template, "loss_newline", False))

    def _item(self, item_id: int) -> dict:
        image = self.store.image(item_id) if self.use_images else None
        return {"attributes": self.store.attributes(item_id), "image": image}

    def render(self, history: list[int], candidates: list[int]):
        """``(chat-template text, images)`` of the prompt for one history and its candidates."""
        prompt = self.template.render([self._item(i) for i in history], [self._item(i) for i in candidates],
                                      self.tokenizer)
        if self.backbone.processor is not None:
            text = self.backbone.processor.apply_chat_template(prompt.messages, add_generation_prompt=True,
                                                               tokenize=False)
        else:
            flat = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")}
                    for m in prompt.messages]
            text = self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
        return text, prompt.images

    def letter_ids(self, prompt_text: str, k: int) -> torch.Tensor:
        """Token ids of the k candidate labels after the prompt (the same for every prompt)."""
        if k not in self._label_ids:
            self._label_ids[k] = torch.tensor(letter_token_ids(self.tokenizer, prompt_text, self.template.labels(k)))
        return self._label_ids[k]

    def encode(self, texts: list[str], images: list[list]):
        """Tokenized (and image-processed) batch of rendered prompts, on the ranker's device."""
        flat = [img for imgs in images for img in imgs]
        if self.backbone.processor is not None:
            inputs = self.backbone.processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
        else:
            inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items()}

    def score(self, histories: list[list[int]], candidates: torch.Tensor) -> torch.Tensor:
        """Scores (batch, k) of the candidates: label logits at the last prompt position."""
        rendered = [self.render(h, c) for h, c in zip(histories, candidates.tolist())]
        texts, images = [r[0] for r in rendered], [r[1] for r in rendered]
        label_ids = self.letter_ids(texts[0], candidates.size(1))
        return score_candidates(self.model, self.encode(texts, images), label_ids).float()

    @torch.no_grad()
    def score_in_batches(self, histories: list[list[int]], candidates: torch.Tensor, batch_size: int | None = None,
                         ) -> torch.Tensor:
        """:meth:`score` of every row, ``batch_size`` prompts per forward pass (``None``: all at
        once); (n, k) float scores on the CPU, (0, k) for no rows. The caller sets eval mode."""
        n, k = len(histories), candidates.size(1)
        if n == 0:
            return torch.zeros(0, k)
        step = batch_size or n
        return torch.cat([self.score(histories[i:i + step], candidates[i:i + step].cpu()).cpu()
                          for i in range(0, n, step)])

    def response_tokens(self, prompt_text: str, full_text: str) -> int:
        """Tokens the loss covers (the template's rule)."""
        return self.template.response_tokens(prompt_text, full_text, self.tokenizer)

    def loss(self, histories: list[list[int]], candidates: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
        """Causal-LM loss on the response only (PRIME: the answer's letter and the end-of-turn token)."""
        rendered = [self.render(h, c) for h, c in zip(histories, candidates.tolist())]
        labels_of = self.template.labels(candidates.size(1))
        texts = [text + self.template.response(labels_of[int(p)], self.tokenizer)
                 for (text, _), p in zip(rendered, answer_pos.tolist())]
        inputs = self.encode(texts, [r[1] for r in rendered])
        labels = letter_labels(inputs["input_ids"], inputs["attention_mask"], self.response_tokens(rendered[0][0], texts[0]))
        return self.model(**inputs, labels=labels).loss


def answer_rank(scores: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's answer among its scored candidates (ties in the answer's favour);
    -1 where the answer is not a candidate (``answer_pos`` -1)."""
    hit = answer_pos >= 0
    rank = torch.full_like(answer_pos, -1)
    if hit.any():
        answer_score = scores[hit].gather(1, answer_pos[hit].unsqueeze(1))
        rank[hit] = (scores[hit] > answer_score).sum(1)
    return rank


def ndcg_at(scores: torch.Tensor, answer_pos: torch.Tensor, k: int = 10) -> torch.Tensor:
    """NDCG@k per row of the answer among the scored candidates (0 where it is not a candidate)."""
    rank = answer_rank(scores, answer_pos)
    inside = (rank >= 0) & (rank < k)
    return torch.where(inside, 1.0 / torch.log2(rank.clamp(min=0).float() + 2), torch.zeros_like(rank, dtype=torch.float))
