"""Stage artefacts keyed by what produced them, written atomically, reused on the next run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from recbole_mm.files import write_json






class StageStore:
    """A folder per stage and key: ``<root>/<stage>-<key>/`` holding that stage's files.

    A stage is finished when its ``done.json`` exists; files are written through temporary names
    and renamed, so an interrupted run never leaves a half-written artefact that looks finished.
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

    def remove_unfinished_empty(self) -> list[Path]:
        """Remove stage folders that hold nothing (a stage that failed before writing); return them."""
        removed = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
                    removed.append(path)
        return removed
