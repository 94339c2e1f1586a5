"""The SQLite files of tierserve's state directory (the usage ledger, stored responses): opened one way."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


def open_state_db(path: Path, schema: str) -> tuple[sqlite3.Connection, threading.Lock]:
    """One connection, used from the event loop's thread and maybe a worker thread, so serialised with the
    returned lock. WAL + NORMAL: no fsync per write on the event loop; a power cut may lose the last few."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=5)
    lock = threading.Lock()
    with lock:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
    return db, lock
