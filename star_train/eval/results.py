"""Per-sample results on disk, so that an interrupted evaluation resumes where it stopped.

One jsonl file: a header line ``{"settings": {...}}`` (what the results depend on: model,
tokenizer, chat format, generation length, ...) and then one line per scored sample,
written and flushed as each is scored. Reopening the file with the same settings skips
the samples it holds; other settings are refused, naming each difference, rather than
mixing two runs' answers in one score. A line cut off by an interruption is dropped.

Under torchrun every rank holds the same rows and only rank 0 writes the file: it opens
the store first (``writer=True``: creating, checking or repairing the file), the other
ranks then read it (``writer=False``) and add rows in memory only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys
            if old.get(key) != new.get(key)]


class ResultStore:
    """Scored rows by ``(category, id)``, kept in ``path`` when one is given."""

    def __init__(self, path: str | Path | None, settings: dict, writer: bool = True):
        self.settings = json.loads(json.dumps(settings))  # as it reads back from disk
        self.rows: dict = {}
        self.path = None if path is None else Path(path)
        self._file = None
        self._writer = writer
        if self.path is None:
            return
        if self.path.exists() and self.path.stat().st_size:
            self._load()
        elif not writer:
            return
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": self.settings}) + "\n")
        if writer:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _load(self):
        good_bytes = 0
        with open(self.path, "rb") as lines:
            for number, line in enumerate(lines):
                if not line.endswith(b"\n"):
                    break  # an interrupted write: everything from here on is dropped
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if number == 0:
                    if not isinstance(record, dict) or "settings" not in record:
                        raise ValueError(f"results: {self.path} is not a results file of "
                                         "star-train eval (no settings line)")
                    changes = _differences(record["settings"], self.settings)
                    if changes:
                        raise ValueError(f"results: {self.path} holds results for other "
                                         f"settings ({'; '.join(changes)}); use another "
                                         "results file")
                else:
                    self.rows[(record["category"], record["id"])] = record
                good_bytes += len(line)
        if good_bytes < self.path.stat().st_size and self._writer:
            os.truncate(self.path, good_bytes)

    def get(self, category: str, sample_id: str) -> dict | None:
        return self.rows.get((category, sample_id))

    def add(self, row: dict):
        self.rows[(row["category"], row["id"])] = row
        if self._file is not None:
            self._file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
