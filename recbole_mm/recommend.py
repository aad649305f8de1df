"""Use a trained model: top-k recommendations for users or for a given history, and why.

Python: ``recommend(model_file, users=["u0001"], k=10)`` or ``recommend(model_file, history=["i0003",
"i0007"])``; command line: ``recbole-mm recommend --model_file=... --user=u0001 --k=10 [--jsonl]
[--explain=why.md]``. ``model_file`` is a run's ``saved_model_file`` (a checkpoint or a manifest,
see :mod:`recbole_mm.manifest`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from recbole_mm.errors import UserError


class Recommender:
    """A loaded model and its dataset, answering top-k queries in batches.

    A user's input is their whole interaction sequence in the dataset (oldest first; sequential
    models read its last ``MAX_ITEM_LIST_LENGTH`` items), so the answer is the next item after
    everything the dataset holds. With the run's ``mask_history: True`` the input items are never
    recommended (non-sequential models: never, as in RecBole's full-ranking evaluation). Two-stage models (PRIME) rank the retriever's top ``n_candidates`` by the ranker
    first, then every other item in the retriever's order, as in evaluation; each PRIME item also
    carries its retriever score and rank and (for candidates) its ranker score.
    """

    def __init__(self, config, model, dataset):
        self.config, self.model, self.dataset = config, model.eval(), dataset
        self.uid_field, self.iid_field = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
        self.item_tokens = list(dataset.field2id_token[self.iid_field])
        self.item_ids = dataset.field2token_id[self.iid_field]
        self.user_ids = dataset.field2token_id[self.uid_field]
        self.sequential = hasattr(model, "ITEM_SEQ")
        self._sequences = None
        self._titles = None

    @classmethod
    def from_file(cls, model_file: str) -> "Recommender":
        from recbole_mm.quick_start import load_data_and_model

        config, model, dataset, *_ = load_data_and_model(model_file)
        return cls(config, model, dataset)

    # ------------------------------------------------------------------------------ inputs
    def sequences(self) -> dict[int, list[int]]:
        """Internal user id -> internal item ids of all their interactions, oldest first."""
        if self._sequences is None:
            feat = self.dataset.inter_feat
            if self.config["ITEM_LIST_LENGTH_FIELD"] in feat.columns:
                # a built sequential dataset holds augmented prefix rows: read the interactions again
                # (RecBole's class: the same filtering, without rebuilding a multimodal dataset's item vectors)
                from recbole.data.dataset import SequentialDataset

                feat = SequentialDataset(self.config).inter_feat
            users = np.asarray(feat[self.uid_field])  # a tensor (built dataset) or a pandas column
            items = np.asarray(feat[self.iid_field])
            time_field = self.config["TIME_FIELD"]
            times = np.asarray(feat[time_field]) if time_field in feat.columns else np.arange(len(users))
            order = np.lexsort((np.arange(len(users)), times, users))
            self._sequences = {}
            for u, i in zip(users[order].tolist(), items[order].tolist()):
                self._sequences.setdefault(u, []).append(i)
        return self._sequences

    def user_id(self, token: str) -> int:
        uid = self.user_ids.get(str(token))
        if uid is None or uid == 0:
            examples = ", ".join(list(self.user_ids)[1:4])
            raise UserError(f"unknown user {token!r}: dataset {self.config['dataset']!r} has no such user "
                            f"(its users look like {examples}); use a user token of the dataset")
        return uid

    def item_id(self, token: str) -> int:
        iid = self.item_ids.get(str(token))
        if iid is None or iid == 0:
            examples = ", ".join(self.item_tokens[1:4])
            raise UserError(f"unknown item {token!r} in the history: dataset {self.config['dataset']!r} has no "
                            f"such item (its items look like {examples}); use item tokens of the dataset")
        return iid

    def title(self, iid: int) -> str | None:
        if self._titles is None:
            self._titles = [None] * len(self.item_tokens)
            try:
                from recbole_mm.data.item_store import ItemStore

                store = getattr(self.dataset, "item_store", None)  # a multimodal dataset has one
                if store is None:
                    store = ItemStore.from_recbole(self.config, self.dataset)
                for i in store.item_ids():
                    title = store.attributes(i).get("title")
                    self._titles[i] = None if title is None else str(title)
            except (UserError, OSError, ValueError):  # no item side file / item file: tokens only
                pass
        return self._titles[iid]

    def interaction(self, histories: list[list[int]], uids: list[int]):
        """A RecBole batch holding each user's input (sequence models) or user id (general models)."""
        from recbole.data.interaction import Interaction

        data = {self.uid_field: torch.tensor(uids, dtype=torch.long)}
        if self.sequential:
            length = self.config["MAX_ITEM_LIST_LENGTH"]
            seq = torch.zeros(len(histories), length, dtype=torch.long)
            lens = torch.zeros(len(histories), dtype=torch.long)
            for row, items in enumerate(histories):
                items = items[-length:]
                seq[row, :len(items)] = torch.tensor(items, dtype=torch.long)
                lens[row] = len(items)
            data[self.model.ITEM_SEQ] = seq
            data[self.model.ITEM_SEQ_LEN] = lens
        return Interaction(data).to(self.config["device"])

    # ------------------------------------------------------------------------------ ranking
    @torch.no_grad()
    def scores(self, histories: list[list[int]], uids: list[int]) -> dict:
        """Scores of every item for each input row, with the run's masking; for PRIME also the
        retriever's scores, the candidates and the ranker's scores."""
        inter = self.interaction(histories, uids)
        # sequential models: the run's mask_history; other models: RecBole's protocol, which always
        # excludes a user's known items from full ranking
        mask = self.config["mask_history"] or not self.sequential
        model = self.model
        out = {}
        if hasattr(model, "retriever_scores"):  # two-stage: retriever, then the ranker on its top-k
            retriever = model.retriever_scores(inter)
            if mask:
                _mask_items(retriever, histories)
            out["retriever"] = retriever
            scores = retriever
            if model.ranker is not None:
                candidates = torch.topk(retriever, model.n_candidates, dim=1).indices
                rows = torch.arange(len(retriever), device=retriever.device)
                ranked = model.ranker.score(model.histories(inter), candidates.cpu()).to(retriever.device)
                scores = model.compose(retriever, candidates, rows, ranked)
                out["candidates"], out["ranker"] = candidates, ranked
        else:
            scores = model.full_sort_predict(inter).view(len(histories), -1).float().clone()
            scores[:, 0] = -torch.inf
            if mask:
                _mask_items(scores, histories)
        out["scores"] = scores
        return out

    def recommend(self, users=None, history=None, k: int = 10, batch_size: int = 256) -> list[dict]:
        """Top-``k`` items (token, score, title) for each user token in ``users``, or for one
        ``history`` (a list of item tokens, oldest first)."""
        if (users is None) == (history is None):
            raise UserError("recommend: give either users (user tokens) or history (item tokens), not both")
        n_items = len(self.item_tokens) - 1
        if not 1 <= int(k) <= n_items:
            raise UserError(f"k={k}: must be between 1 and the number of items ({n_items})")
        if users is not None:
            users = [users] if isinstance(users, str) else list(users)
            uids = [self.user_id(u) for u in users]
            histories = [self.sequences().get(u, []) for u in uids]
        else:
            if not self.sequential:
                raise UserError(f"model {self.config['model']} is not a sequential model: it recommends for "
                                f"known users only; use users=... (--user=...)")
            histories = [[self.item_id(t) for t in history]]
            if not histories[0]:
                raise UserError("history is empty: give at least one item token")
            users, uids = [None], [0]
        results = []
        for start in range(0, len(histories), batch_size):
            part = slice(start, start + batch_size)
            results += self._rank(users[part], uids[part], histories[part], int(k))
        return results

    def _rank(self, users, uids, histories, k) -> list[dict]:
        out = self.scores(histories, uids)
        top = torch.topk(out["scores"], k, dim=1)
        retriever_rank = None
        if "retriever" in out:
            retriever_rank = torch.argsort(torch.argsort(out["retriever"], dim=1, descending=True, stable=True), dim=1)
        results = []
        for row, user in enumerate(users):
            items = []
            for rank, (iid, score) in enumerate(zip(top.indices[row].tolist(), top.values[row].tolist()), 1):
                item = {"rank": rank, "item": self.item_tokens[iid], "score": score, "title": self.title(iid)}
                if retriever_rank is not None:
                    item["retriever_score"] = float(out["retriever"][row, iid])
                    item["retriever_rank"] = int(retriever_rank[row, iid]) + 1
                    if "candidates" in out:
                        hit = (out["candidates"][row] == iid).nonzero()
                        item["ranker_score"] = float(out["ranker"][row, hit[0, 0]]) if len(hit) else None
                items.append(item)
            results.append({"user": user, "history": [self.item_tokens[i] for i in histories[row]],
                            "items": items})
        return results


def _mask_items(scores: torch.Tensor, histories: list[list[int]]) -> None:
    """Set every row's history items to -inf, in place (one indexed write for the whole batch)."""
    counts = torch.tensor([len(items) for items in histories], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(histories)), counts).to(scores.device)
    items = torch.tensor([i for items in histories for i in items], dtype=torch.long, device=scores.device)
    scores[rows, items] = -torch.inf


def recommend(model_file: str, users=None, history=None, k: int = 10, batch_size: int = 256) -> list[dict]:
    """Load ``model_file`` and return the top-``k`` items for ``users`` (tokens) or one ``history``
    (item tokens, oldest first): one dict per input with ``user``, ``history`` and ``items`` (rank,
    item token, score, title; PRIME adds retriever score/rank and ranker score)."""
    return Recommender.from_file(model_file).recommend(users=users, history=history, k=k, batch_size=batch_size)


def evaluate_saved(model_file: str, split: str = "test") -> dict:
    """Reload ``model_file`` and evaluate it on the run's ``test`` (or ``valid``) split, as the run did."""
    from recbole_mm.quick_start import load_data_and_model
    from recbole_mm.utils import get_trainer

    if split not in ("valid", "test"):
        raise UserError(f"split={split!r}: use 'valid' or 'test'")
    config, model, _, train_data, valid_data, test_data = load_data_and_model(model_file)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.eval_collector.data_collect(train_data)
    data = test_data if split == "test" else valid_data
    return dict(trainer.evaluate(data, load_best_model=False, show_progress=False))


# ---------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recbole-mm recommend",
                                     description="Top-k recommendations of a trained recbole-mm run.")
    parser.add_argument("--model_file", required=True, help="a run's saved_model_file (checkpoint or manifest)")
    parser.add_argument("--user", default=None, help="user token(s), comma-separated")
    parser.add_argument("--user_file", default=None, help="a file with one user token per line (batched)")
    parser.add_argument("--history", default=None, help="item tokens, comma-separated, oldest first")
    parser.add_argument("--k", type=int, default=10, help="number of items (default 10)")
    parser.add_argument("--batch_size", type=int, default=256, help="users per forward pass")
    parser.add_argument("--jsonl", action="store_true", help="one JSON object per user instead of a table")
    parser.add_argument("--explain", default=None, metavar="FILE.md",
                        help="write why (prompt, candidates, scores) for the first user as markdown")
    return parser


def _users(args) -> list[str] | None:
    users = [u.strip() for u in args.user.split(",") if u.strip()] if args.user else []
    if args.user_file:
        if not os.path.isfile(args.user_file):
            raise UserError(f"--user_file={args.user_file}: no such file; check the path")
        with open(args.user_file, encoding="utf-8") as f:
            users += [line.strip() for line in f if line.strip()]
    return users or None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        users = _users(args)
        history = [t.strip() for t in args.history.split(",") if t.strip()] if args.history else None
        if (users is None) == (history is None):
            raise UserError("give --user (or --user_file) or --history, not both and not neither")
        if args.explain and not os.path.isdir(os.path.dirname(os.path.abspath(args.explain))):
            raise UserError(f"--explain={args.explain}: its folder does not exist; create it first")
        recommender = Recommender.from_file(args.model_file)
        results = recommender.recommend(users=users, history=history, k=args.k, batch_size=args.batch_size)
        if args.explain:
            from recbole_mm.explain import explain

            explain(recommender, args.explain, user=users[0] if users else None, history=history, k=args.k)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for result in results:
        if args.jsonl:
            print(json.dumps(result, ensure_ascii=False))
            continue
        who = f"user {result['user']}" if result["user"] is not None else "history"
        print(f"# {who} ({len(result['history'])} items, last: {', '.join(result['history'][-3:])})")
        for item in result["items"]:
            extra = ""
            if "retriever_rank" in item:
                ranker = item.get("ranker_score")
                extra = f"  retriever #{item['retriever_rank']}" + (f"  ranker {ranker:.3f}" if ranker is not None else "")
            print(f"{item['rank']:>3}  {item['item']:<12} {item['score']:>9.4f}  {item['title'] or ''}{extra}")
    if args.explain:
        print(f"explanation written to {args.explain}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
