"""Which on-disk store for the broker (issue 12): stdlib sqlite3 in WAL mode against LMDB.

    .venv/bin/python bench/store_bench.py                  # every variant, 3 repeats
    .venv/bin/python bench/store_bench.py --batches 1,32 --payload 64 --repeats 5

The workload is what broker/store.py writes for a durable QoS 1/2 delivery: one message row
(the payload once) and one delivery row per message, committed in one transaction per event
loop turn with the other messages of that turn (``--batches``: messages per turn), then the
same rows deleted when the subscriber acknowledges, again one transaction per turn. Figures:
microseconds per message (insert + delete, both commits included) and messages per second,
for

- ``sqlite-normal``: WAL + synchronous=NORMAL (survives SIGKILL, not a power loss): the
  broker's default;
- ``sqlite-full``: WAL + synchronous=FULL (an fsync per commit: survives a power loss);
- ``lmdb-nosync``: LMDB with sync=False (the OS page cache has every commit: survives
  SIGKILL, not a power loss), the like-for-like rival of sqlite-normal;
- ``lmdb-sync``: LMDB with sync=True (fsync per commit), against sqlite-full.

LMDB is the ``lmdb`` package from PyPI, not a dependency of the project: the LMDB variants
are skipped when it is not installed (``pip install lmdb`` to run them). Variants run
interleaved, the order alternating per repeat; medians of ``--repeats`` are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MESSAGE = struct.Struct(">Q")


def sqlite_variant(
    directory: Path, synchronous: str
) -> tuple[Callable[..., None], Callable[[], None]]:
    connection = sqlite3.connect(directory / "bench.db", isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={synchronous}")
    connection.executescript(
        """
        CREATE TABLE messages (id TEXT PRIMARY KEY, record BLOB, saved_at REAL) WITHOUT ROWID;
        CREATE TABLE deliveries (client_id TEXT, key INTEGER, message TEXT, flags INTEGER,
            packet_id INTEGER, identifiers TEXT, PRIMARY KEY (client_id, key)) WITHOUT ROWID;
        """
    )

    def turn(inserts: list[tuple[int, bytes]], deletes: list[int]) -> None:
        connection.execute("BEGIN")
        for key, payload in inserts:
            message_id = f"node-1:{key}"
            connection.execute(
                "INSERT OR REPLACE INTO messages VALUES (?, ?, ?)", (message_id, payload, 0.0)
            )
            connection.execute(
                "INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?, ?)",
                ("device-0001", key, message_id, 1, 0, ""),
            )
        for key in deletes:
            connection.execute(
                "DELETE FROM deliveries WHERE client_id=? AND key=?", ("device-0001", key)
            )
            connection.execute("DELETE FROM messages WHERE id=?", (f"node-1:{key}",))
        connection.execute("COMMIT")

    return turn, connection.close


def lmdb_variant(directory: Path, sync: bool) -> tuple[Callable[..., None], Callable[[], None]]:
    import lmdb  # noqa: PLC0415 (optional: only this variant needs it)

    environment = lmdb.open(
        str(directory / "bench.lmdb"), map_size=1 << 30, max_dbs=2, sync=sync, metasync=sync
    )
    messages = environment.open_db(b"messages")
    deliveries = environment.open_db(b"deliveries")

    def turn(inserts: list[tuple[int, bytes]], deletes: list[int]) -> None:
        with environment.begin(write=True) as transaction:
            for key, payload in inserts:
                message_id = f"node-1:{key}".encode()
                transaction.put(message_id, payload, db=messages)
                transaction.put(
                    b"device-0001\x00" + MESSAGE.pack(key), message_id + b"|1|0|", db=deliveries
                )
            for key in deletes:
                transaction.delete(b"device-0001\x00" + MESSAGE.pack(key), db=deliveries)
                transaction.delete(f"node-1:{key}".encode(), db=messages)

    return turn, environment.close


VARIANTS: dict[str, Callable[[Path], tuple[Callable[..., None], Callable[[], None]]]] = {
    "sqlite-normal": lambda d: sqlite_variant(d, "NORMAL"),
    "sqlite-full": lambda d: sqlite_variant(d, "FULL"),
    "lmdb-nosync": lambda d: lmdb_variant(d, False),
    "lmdb-sync": lambda d: lmdb_variant(d, True),
}


def lmdb_available() -> bool:
    try:
        import lmdb  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def measure(name: str, batch: int, payload: int, messages: int, workdir: Path) -> float:
    """Microseconds per message: its insert turn and its delete turn, commits included."""
    directory = Path(tempfile.mkdtemp(dir=workdir))
    try:
        turn, close = VARIANTS[name](directory)
        data = os.urandom(payload)
        key = 0
        turns = max(1, messages // batch)
        started = time.perf_counter()
        previous: list[int] = []
        for _ in range(turns):
            inserts = [(key + i, data) for i in range(batch)]
            key += batch
            # The acknowledgements of the last turn's messages come in this turn.
            turn(inserts, previous)
            previous = [k for k, _ in inserts]
        turn([], previous)
        elapsed = time.perf_counter() - started
        close()
        return elapsed / (turns * batch) * 1e6
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sqlite3 WAL against LMDB for the broker store")
    parser.add_argument("--batches", default="1,8,64", help="messages per loop turn")
    parser.add_argument("--payload", type=int, default=64, help="payload bytes")
    parser.add_argument("--messages", type=int, default=4000, help="messages per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=None, help="where the files go")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not lmdb_available():
        variants = [v for v in variants if not v.startswith("lmdb")]
    workdir = args.workdir or Path(tempfile.gettempdir())
    results: dict[str, dict[str, Any]] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        runs: dict[str, list[float]] = {v: [] for v in variants}
        for repeat in range(args.repeats):
            order = variants if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                # fsync per commit is slow: fewer messages keep a run short.
                count = args.messages if "full" not in name and name != "lmdb-sync" else 400
                runs[name].append(measure(name, batch, args.payload, count, workdir))
        for name, values in runs.items():
            median = statistics.median(values)
            results.setdefault(f"batch {batch}", {})[name] = {
                "us_per_message": round(median, 1),
                "messages_per_second": round(1e6 / median),
            }
    print(json.dumps({"payload": args.payload, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
