"""An LMM that ranks candidate items: prompt -> one forward pass -> letter logits (verbalizer)."""

from __future__ import annotations

import torch

from recbole_mm.lmm.prompts import PromptSettings, build_prompt, index_letters
from recbole_mm.lmm.verbalizer import letter_labels, letter_token_ids, response_text, score_candidates


class LMMRanker:
    """PRIME's ranker: builds prompts from item ids, scores candidates, computes the training loss.

    ``backbone`` comes from :func:`recbole_mm.lmm.backbone.load_backbone`; ``store`` is the
    dataset's :class:`~recbole_mm.data.item_store.ItemStore`. Histories are lists of internal item
    ids (oldest first); candidates a LongTensor (batch, k). Images are used only when the backbone
    is a vision-language model and the prompt variant keeps them.
    """

    def __init__(self, backbone, store, settings: PromptSettings, device="cpu", loss_newline: bool = False):
        self.backbone, self.store, self.settings, self.device = backbone, store, settings, device
        self.loss_newline = loss_newline  # the loss also covers a newline after the end-of-turn (reference code)
        self.tokenizer = backbone.tokenizer
        self.use_images = backbone.is_vision and settings.variant in ("full", "no_title")
        self._letter_ids: dict[int, torch.Tensor] = {}

    @property
    def model(self):
        return self.backbone.model

    def _item(self, item_id: int) -> dict:
        image = self.store.image(item_id) if self.use_images else None
        return {"attributes": self.store.attributes(item_id), "image": image}

    def render(self, history: list[int], candidates: list[int]):
        """``(chat-template text, images)`` of the prompt for one history and its candidates."""
        prompt = build_prompt([self._item(i) for i in history], [self._item(i) for i in candidates],
                              self.settings, self.tokenizer)
        if self.backbone.processor is not None:
            text = self.backbone.processor.apply_chat_template(prompt.messages, add_generation_prompt=True,
                                                               tokenize=False)
        else:
            flat = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")}
                    for m in prompt.messages]
            text = self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
        return text, prompt.images

    def letter_ids(self, prompt_text: str, k: int) -> torch.Tensor:
        """Token ids of the k index letters after the prompt (the same for every prompt)."""
        if k not in self._letter_ids:
            self._letter_ids[k] = torch.tensor(letter_token_ids(self.tokenizer, prompt_text, index_letters(k)))
        return self._letter_ids[k]

    def encode(self, texts: list[str], images: list[list]):
        """Tokenized (and image-processed) batch of rendered prompts, on the ranker's device."""
        flat = [img for imgs in images for img in imgs]
        if self.backbone.processor is not None:
            inputs = self.backbone.processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
        else:
            inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items()}

    def score(self, histories: list[list[int]], candidates: torch.Tensor) -> torch.Tensor:
        """Scores (batch, k) of the candidates: letter logits at the last prompt position."""
        rendered = [self.render(h, c) for h, c in zip(histories, candidates.tolist())]
        texts, images = [r[0] for r in rendered], [r[1] for r in rendered]
        letter_ids = self.letter_ids(texts[0], candidates.size(1))
        return score_candidates(self.model, self.encode(texts, images), letter_ids).float()

    def response_tokens(self, prompt_text: str, full_text: str) -> int:
        """Tokens the loss covers: 2 (letter, end-of-turn), or with ``loss_newline`` those of the
        whole response as the tokenizer splits it (letter, end-of-turn, newline)."""
        if not self.loss_newline:
            return 2
        ids = lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        return len(ids(full_text)) - len(ids(prompt_text))

    def loss(self, histories: list[list[int]], candidates: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
        """Causal-LM loss on the response only: the answer's letter and the end-of-turn token."""
        rendered = [self.render(h, c) for h, c in zip(histories, candidates.tolist())]
        letters = index_letters(candidates.size(1))
        suffix = "\n" if self.loss_newline else ""
        texts = [text + response_text(self.tokenizer, letters[int(p)]) + suffix
                 for (text, _), p in zip(rendered, answer_pos.tolist())]
        inputs = self.encode(texts, [r[1] for r in rendered])
        labels = letter_labels(inputs["input_ids"], inputs["attention_mask"], self.response_tokens(rendered[0][0], texts[0]))
        return self.model(**inputs, labels=labels).loss
