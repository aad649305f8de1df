"""Stage artefacts keyed by what produced them, written atomically, reused on the next run; and the
rule that decides which settings make up a stage's key."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from recbole_mm.files import write_json

logger = getLogger(__name__)

# Settings that change what is reported (or how fast / how verbosely), never what a stage trains:
# no stage key holds them, so changing one reuses every stage.
EVALUATION_ONLY_KEYS = frozenset({
    "metrics", "topk", "eval_batch_size", "show_progress", "state", "checkpoint_dir",
    "ranker_eval_batch_size", "ranker_log_every", "rank_only_hits", "artifacts_dir",
})


@dataclass(frozen=True)
class StageRule:
    """Settings that belong to ``stage`` (and, through the chained keys, to the stages after it):
    the keys named in ``keys`` and those starting with one of ``prefixes``."""

    stage: str
    prefixes: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()

    def matches(self, key: str) -> bool:
        return key in self.keys or key.startswith(self.prefixes)


EVERY_STAGE = "*"


class StageKeys:
    """Which of a model's settings make up each stage's key, by rule instead of hand-kept lists.

    Every key of the model's shipped yaml files (e.g. ``_lmm.yaml`` + ``PRIME.yaml``) counts,
    unless it is evaluation-only (:data:`EVALUATION_ONLY_KEYS` plus ``evaluation_only``). A key goes
    to the first rule that matches it; a key in ``every_stage``, or one that matches no rule, goes
    into every stage's key (conservative: a new setting retrains rather than silently reusing a
    stale artefact). ``inputs`` are settings from outside the model's yaml that every stage
    depends on (e.g. ``seed``). Each stage's key also holds the key of the stage before it
    (the caller chains them), so a setting of stage 2 retrains stage 3 as well.
    """

    def __init__(self, stages: Sequence[str], rules: Sequence[StageRule], keys: Iterable[str],
                 every_stage: Iterable[str] = (), evaluation_only: Iterable[str] = (), inputs: Iterable[str] = ()):
        self.stages = tuple(stages)
        unknown = [r.stage for r in rules if r.stage not in self.stages]
        if unknown:
            raise ValueError(f"stage rules name unknown stages {unknown}; stages are {self.stages}")
        self.rules = tuple(rules)
        self.keys = tuple(dict.fromkeys(keys))
        self.every_stage = frozenset(every_stage)
        self.evaluation_only = EVALUATION_ONLY_KEYS | frozenset(evaluation_only)
        self.inputs = tuple(inputs)

    def classify(self, key: str) -> str | None:
        """The stage ``key`` belongs to, :data:`EVERY_STAGE`, or ``None`` (evaluation-only)."""
        if key in self.evaluation_only:
            return None
        if key in self.every_stage:
            return EVERY_STAGE
        for rule in self.rules:
            if rule.matches(key):
                return rule.stage
        return EVERY_STAGE

    def unclassified(self) -> list[str]:
        """Keys that match no rule and are not declared (every-stage or evaluation-only): they go
        into every stage's key; a test keeps this list empty so that each key is a decision."""
        return [k for k in self.keys if k not in self.evaluation_only and k not in self.every_stage
                and not any(rule.matches(k) for rule in self.rules)]

    def stage_keys(self, stage: str) -> list[str]:
        """The settings in ``stage``'s key (sorted), ``inputs`` included."""
        if stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r}; stages are {self.stages}")
        own = [k for k in self.keys if self.classify(k) in (stage, EVERY_STAGE)]
        return sorted(set(own) | set(self.inputs))

    def settings(self, config: Mapping, stage: str) -> dict:
        """``{key: value}`` of ``stage``'s settings in ``config`` (what its fingerprint is made of)."""
        return {k: config[k] for k in self.stage_keys(stage)}


class StageStore:
    """A folder per stage and key: ``<root>/<stage>-<key>/`` holding that stage's files.

    A stage is finished when its ``done.json`` exists; files are written through temporary names
    and renamed, so an interrupted run never leaves a half-written artefact that looks finished.
    :meth:`run` is the one "done? reuse : compute, finish" path of every stage.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def folder(self, stage: str, key: str) -> Path:
        path = self.root / f"{stage}-{key}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, stage: str, key: str) -> dict | None:
        marker = self.root / f"{stage}-{key}" / "done.json"
        if not marker.is_file():
            return None
        with open(marker, encoding="utf-8") as f:
            return json.load(f)

    def finish(self, stage: str, key: str, info: dict) -> None:
        write_json(self.folder(stage, key) / "done.json", info)

    def run(self, stage: str, key: str, compute: Callable[[Path], dict],
            load: Callable[[Path, dict], None] | None = None) -> tuple[dict, bool]:
        """Run or reuse one stage: ``(info, reused)``.

        Finished before (``done.json``): ``load(folder, info)`` restores its result. Otherwise
        ``compute(folder)`` writes the stage's files into ``folder`` (atomically, e.g.
        ``atomic_save``; files it keeps for resuming stay there) and returns the stage's info, which
        becomes ``done.json``, written last. An exception leaves no ``done.json`` and, when the
        folder is still empty, no folder.
        """
        info = self.done(stage, key)
        folder = self.folder(stage, key)
        if info is not None:
            logger.info(f"stage {stage}: reusing {folder}")
            if load is not None:
                load(folder, info)
            return info, True
        try:
            info = compute(folder)
        except BaseException:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            raise
        self.finish(stage, key, info)
        return info, False

    def remove_unfinished_empty(self) -> list[Path]:
        """Remove stage folders that hold nothing (a stage that failed before writing); return them."""
        removed = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
                    removed.append(path)
        return removed
