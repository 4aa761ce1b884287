"""A persistent request -> completion cache, so a crashed generation run resumes where it died.

Why: translating or generating hundreds of thousands of rows through an LLM endpoint takes
hours and costs money; a server that dies mid-run, a network blip or a killed process must
not lose the completions already paid for.

How: one SQLite file (stdlib ``sqlite3``, WAL journal, ``synchronous=FULL``). Every
completion is committed the moment it arrives, keyed by the SHA-256 of the canonical JSON
of the request (model, messages, sampling parameters). A rerun with the same requests finds
them in the file and only sends the missing ones. Values are plain text: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any


def request_key(request: dict[str, Any]) -> str:
    """A stable key for a request: SHA-256 of its canonical JSON."""
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CompletionCache:
    """Thread-safe SQLite store of completions; each ``put`` is durable when it returns."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS completions ("
                " key TEXT PRIMARY KEY, request TEXT NOT NULL, response TEXT NOT NULL,"
                " created REAL NOT NULL)"
            )
            self._conn.commit()

    def get(self, request: dict[str, Any]) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT response FROM completions WHERE key = ?", (request_key(request),)
            ).fetchone()
        return None if row is None else row[0]

    def put(self, request: dict[str, Any], response: str) -> None:
        payload = json.dumps(request, sort_keys=True, ensure_ascii=False)
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO completions (key, request, response, created)"
                " VALUES (?, ?, ?, ?)",
                (request_key(request), payload, response, time.time()),
            )
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> CompletionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
