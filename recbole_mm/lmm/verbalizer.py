"""PRIME's verbalizer: candidates are labelled (A), (B), ...; their scores are the logits of the
letter tokens at the last prompt position, from ONE forward pass (no generation).

Training target: the answer's letter followed by the end-of-turn token; the loss covers only those
response tokens (every prompt token is labelled -100).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from recbole_mm.errors import UserError

IGNORE_INDEX = -100


class VerbalizerError(UserError, ValueError):
    """A letter does not map to exactly one token after the prompt."""


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def letter_token_ids(tokenizer, prompt_text: str, letters: Sequence[str]) -> list[int]:
    """Token id of each letter as it follows ``prompt_text``.

    The full text ``prompt_text + letter`` is tokenized and compared with the tokenization of
    ``prompt_text`` alone: after their common prefix exactly one token must remain (it may be the
    letter merged with a trailing space/newline of the prompt). Otherwise a :class:`VerbalizerError`
    names the letter.
    """
    base = _encode(tokenizer, prompt_text)
    ids = []
    for letter in letters:
        full = _encode(tokenizer, prompt_text + letter)
        common = 0
        for a, b in zip(base, full):
            if a != b:
                break
            common += 1
        new = full[common:]
        if len(new) != 1 or common < len(base) - 1:
            pieces = [tokenizer.convert_ids_to_tokens(i) for i in new]
            raise VerbalizerError(
                f"letter {letter!r} does not map to exactly one new token after the prompt "
                f"(new tokens: {pieces}); the verbalizer needs single-token index letters")
        ids.append(int(new[0]))
    if len(set(ids)) != len(ids):
        raise VerbalizerError(f"index letters {list(letters)} do not map to distinct tokens: {ids}")
    return ids


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    mask = attention_mask.bool()
    length = mask.size(1)
    flipped_first = mask.flip(1).float().argmax(1)  # first 1 from the right
    return (length - 1 - flipped_first).long()


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def score_candidates(model, inputs: dict, letter_ids) -> torch.Tensor:
    """Scores (batch, k): the last-position logits of the letter tokens, one forward pass.

    ``inputs`` is the processor/tokenizer output (input_ids, attention_mask, pixel_values, ...);
    the last real position of each row comes from the attention mask (left or right padding).
    Only the needed positions go through the output head when the model supports
    ``logits_to_keep``.
    """
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    last = last_positions(mask)
    letter_ids = torch.as_tensor(letter_ids, dtype=torch.long)
    kwargs = dict(inputs)
    kwargs.setdefault("use_cache", False)
    rows = torch.arange(input_ids.size(0), device=input_ids.device)
    if _accepts_logits_to_keep(model):
        positions, inverse = torch.unique(last, return_inverse=True)
        kwargs["logits_to_keep"] = positions.to(input_ids.device)
        logits = model(**kwargs).logits  # (batch, n_positions, vocab)
        picked = logits[rows, inverse.to(logits.device)]
    else:
        logits = model(**kwargs).logits
        picked = logits[rows, last.to(logits.device)]
    return picked[:, letter_ids.to(picked.device)]


def end_of_turn_token(tokenizer) -> str:
    """The token that closes the assistant's turn: ChatML's <|im_end|> when the vocabulary has it,
    else the tokenizer's eos token."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return "<|im_end|>"
    if tokenizer.eos_token is None:
        raise VerbalizerError("the tokenizer has no end-of-turn / eos token")
    return tokenizer.eos_token


def response_text(tokenizer, letter: str) -> str:
    """The training response appended to the prompt: the answer letter and the end-of-turn token."""
    return letter + end_of_turn_token(tokenizer)


def letter_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  response_tokens: int = 2) -> torch.Tensor:
    """Labels for texts ``prompt + letter + end-of-turn``: each row keeps its last
    ``response_tokens`` real tokens (letter, end-of-turn) and every other position is -100
    (prompt and padding; left or right padding). Pass the result as ``labels`` to the model."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    last = last_positions(attention_mask)
    lengths = attention_mask.bool().sum(1)
    if bool((lengths < response_tokens + 1).any()):
        raise ValueError("a row is shorter than the response plus one prompt token")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    rows = torch.arange(input_ids.size(0), device=input_ids.device)
    for offset in range(response_tokens):
        labels[rows, last - offset] = input_ids[rows, last - offset]
    return labels
