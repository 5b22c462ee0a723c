"""The simulator's files: records in memory, contents in a temporary directory owned by the app."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbatch.simulator.errors import not_found


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: Path

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose, "status": "processed",
        }


class FileStore:
    """File records in memory, contents on disk under a directory made on first use."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._files: dict[str, StoredFile] = {}

    @property
    def directory(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="tierbatch-sim-"))
        return self._dir

    def new_id(self) -> str:
        return "file-" + os.urandom(12).hex()

    def path_for(self, file_id: str) -> Path:
        return self.directory / f"{file_id}.jsonl"

    def add(self, file_id: str, filename: str, purpose: str, path: Path) -> StoredFile:
        stored = StoredFile(file_id, filename, purpose, path.stat().st_size, int(time.time()), path)
        self._files[file_id] = stored
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        return self._files.get(file_id)

    def all(self) -> list[StoredFile]:
        return list(self._files.values())

    def require(self, file_id: str) -> StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            raise not_found("File", file_id)
        return stored

    def delete(self, file_id: str) -> StoredFile:
        stored = self.require(file_id)
        del self._files[file_id]
        with contextlib.suppress(FileNotFoundError):
            stored.path.unlink()
        return stored

    def close(self) -> None:
        self._files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
