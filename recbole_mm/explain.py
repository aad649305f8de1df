"""Why a trained model recommends what it does, for one user, as a markdown file a person can read.

PRIME (LMM ranker): the exact prompt the ranker read (the chat-template text, with each image
placeholder numbered and the images written next to the markdown file), every candidate with the
retriever's score and rank, the ranker's letter logit and rank, and the letter probabilities
(softmax over the candidates' letters). VLM4Rec: for each recommended item, the history items whose
vectors contribute most to its cosine with the profile; the contributions add up to the score.
Any other model: the input history and the top-k list.
"""

from __future__ import annotations

import os

import torch


def _md(text) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def explain(recommender, path: str, user: str | None = None, history: list[str] | None = None, k: int = 10) -> str:
    """Write the explanation of ``user``'s (or ``history``'s) top-``k`` to ``path``; returns ``path``."""
    from recbole_mm.files import atomic_output

    rec = recommender
    result = rec.recommend(users=[user] if user is not None else None, history=history, k=k)[0]
    ids = [rec.item_id(t) for t in result["history"]]
    uid = rec.user_id(user) if user is not None else 0
    title = rec.title
    lines = [f"# Why {rec.config['model']} recommends these items to "
             + (f"user `{user}`" if user is not None else "this history"), "",
             f"Dataset `{rec.config['dataset']}`, mask_history = {rec.config['mask_history']}; input: the last "
             f"{min(len(ids), rec.config['MAX_ITEM_LIST_LENGTH'])} of {len(ids)} items (oldest first):", ""]
    window = ids[-rec.config["MAX_ITEM_LIST_LENGTH"]:]
    lines += [f"{n}. `{rec.item_tokens[i]}` {_md(title(i))}" for n, i in enumerate(window, 1)] + [""]
    lines += ["## Top-%d" % k, "", "| rank | item | title | score |", "|---:|---|---|---:|"]
    lines += [f"| {i['rank']} | `{i['item']}` | {_md(i['title'])} | {i['score']:.4f} |" for i in result["items"]]
    lines.append("")
    model = rec.model
    if getattr(model, "ranker", None) is not None:
        lines += _prime(rec, ids, uid, path)
    elif hasattr(model, "user_profiles") and hasattr(model, "item_table"):
        lines += _vlm4rec(rec, window, result)
    with atomic_output(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@torch.no_grad()
def _prime(rec, ids, uid, path) -> list[str]:
    model = rec.model
    ranker = model.ranker
    out = rec.scores([ids], [uid])
    inter = rec.interaction([ids], [uid])
    history = model.histories(inter)[0]
    candidates = out["candidates"][0].tolist()
    text, images = ranker.render(history, candidates)
    logits = out["ranker"][0].float()
    probs = torch.softmax(logits, 0)
    retriever = out["retriever"][0]
    retriever_rank = torch.argsort(torch.argsort(retriever, descending=True, stable=True)) + 1
    ranker_rank = torch.argsort(torch.argsort(logits, descending=True, stable=True)) + 1
    from recbole_mm.lmm.prompts import index_letters

    letters = index_letters(len(candidates))
    lines = ["## Stage 2: the LMM ranker", "",
             f"The retriever (`{rec.config['retriever']}`) proposes its top {len(candidates)} items; the ranker "
             f"reads one prompt with the last {len(history)} history items and the candidates under letters, and "
             f"scores each candidate by the logit of its letter at the answer position (one forward pass). "
             f"Probability = softmax over the {len(candidates)} letters.", "",
             "| letter | item | title | retriever score | retriever rank | ranker logit | ranker rank | probability |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    order = sorted(range(len(candidates)), key=lambda j: int(ranker_rank[j]))
    for j in order:
        i = candidates[j]
        lines.append(f"| {letters[j]} | `{rec.item_tokens[i]}` | {_md(rec.title(i))} | {float(retriever[i]):.4f} | "
                     f"{int(retriever_rank[i])} | {float(logits[j]):.4f} | {int(ranker_rank[j])} | "
                     f"{float(probs[j]):.3f} |")
    lines += ["", "## The exact prompt", ""]
    if images:
        stem = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.join(os.path.dirname(os.path.abspath(path)), f"{stem}_images")
        os.makedirs(folder, exist_ok=True)
        lines += [f"{len(images)} images, in the order of the image placeholders in the text "
                  f"(files in `{stem}_images/`):", ""]
        # the prompt takes one image per item that has one: history items first, then the candidates
        owners = [f"history item {n} `{rec.item_tokens[i]}`" for n, i in enumerate(history, 1)]
        owners += [f"candidate ({letters[j]}) `{rec.item_tokens[i]}`" for j, i in enumerate(candidates)]
        with_image = [o for o, i in zip(owners, list(history) + candidates) if ranker.store.has_image(i)]
        if len(with_image) != len(images):
            with_image = [""] * len(images)
        for n, (image, owner) in enumerate(zip(images, with_image), 1):
            name = f"image{n:02d}.png"
            image.save(os.path.join(folder, name))
            lines.append(f"{n}. {owner} ![image {n}]({stem}_images/{name})")
        lines.append("")
    else:
        lines += ["No images (the backbone is text-only or the prompt variant drops them).", ""]
    lines += ["```text", text, "```", ""]
    return lines


def _vlm4rec(rec, window, result) -> list[str]:
    model = rec.model
    recent = window[-model.history_length:]
    lines = ["## Which history items make each recommendation (VLM4Rec)", "",
             f"The profile is the normalised mean of the last {len(recent)} items' vectors; an item's score is "
             f"its cosine with the profile, which splits exactly into one share per history item h: "
             f"(v_h . v_item) / (n |mean|), n = history items.", "",
             "| rank | item | score | top history items (share) |", "|---:|---|---:|---|"]
    for item in result["items"]:
        shares = history_shares(rec, window, item["item"])
        top = sorted(range(len(recent)), key=lambda j: -shares[j])[:3]
        parts = ", ".join(f"`{rec.item_tokens[recent[j]]}` {_md(rec.title(recent[j]))} ({shares[j]:+.3f})"
                          for j in top)
        lines.append(f"| {item['rank']} | `{item['item']}` {_md(item['title'])} | {item['score']:.4f} | {parts} |")
    lines.append("")
    return lines


@torch.no_grad()
def history_shares(rec, window: list[int], item_token: str) -> list[float]:
    """The share of each of the last ``history_length`` items of ``window`` in ``item_token``'s VLM4Rec
    score: cos(p, v_i) with p = m / |m|, m the mean of the n history vectors, is the sum over h of
    (v_h . v_i) / (n |m|) (an item without a vector has a zero vector: share 0, but it counts in n)."""
    model = rec.model
    table = model.item_table()
    recent = window[-model.history_length:]
    vectors = table[torch.tensor(recent, dtype=torch.long, device=table.device)]
    n = len(recent)  # the profile's mean counts every history item (one without a vector adds zero)
    mean_norm = float(vectors.mean(0).norm()) if n else 0.0
    if mean_norm == 0:
        return [0.0] * len(recent)
    return ((vectors @ table[rec.item_id(item_token)]) / (n * mean_norm)).tolist()
