"""broker/store.py on a real SQLite file: what is written comes back, group commit runs the
after-commit callbacks in order once their writes are on disk, a process killed with SIGKILL
right after a callback ran still has what the callback promised, and the file is 0600."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from broker import cluster_codec as codec
from broker.config import StoreConfig
from broker.mqtt import Properties
from broker.store import DiskStore, StoreError
from broker.subscriptions import SubscriptionOptions

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def wire(seq: int, payload: bytes = b"p", expiry_ms: int | None = None) -> codec.WireMessage:
    return codec.WireMessage(
        "t/1", payload, 1, False, Properties(), "node-1", "pub", seq, expiry_ms
    )


def store_at(path: Path) -> DiskStore:
    return DiskStore(StoreConfig(mode="disk", path=path))


def test_what_is_written_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "data" / "node.db"
    version = codec.Version(9, "node-1")

    async def write() -> list[str]:
        store = store_at(path)
        store.load()
        store.start(asyncio.get_running_loop())
        events: list[str] = []
        record = codec.SessionRecord(
            "dev", 3600, 1e9, version, 5, (("a/#", SubscriptionOptions(2, False, True, 0, 7)),)
        )
        store.save_session(record)
        store.add_incoming("dev", 12)
        store.add_delivery("dev", 1, codec.DeliveryRecord(wire(1), 1, False))
        store.add_delivery("dev", 2, codec.DeliveryRecord(wire(2), 2, True, (7,), 33))
        # The same message for a second session: stored once, referenced twice.
        store.add_delivery("other", 3, codec.DeliveryRecord(wire(2), 1, False))
        store.save_session(codec.SessionRecord("other", 60, None, version))
        store.after_commit(lambda: events.append("first"))
        store.update_delivery("dev", 2, 33, True, True)
        store.remove_delivery("other", 3, "node-1:2")
        store.set_retained("status", wire(50, b"on"), 123.5)
        store.add_outbox("node-2", 1, b"frame-1")
        store.add_outbox("node-2", 2, b"frame-2")
        store.ack_outbox("node-2", 1)
        store.set_route("node-2", "x/#", True)
        store.set_state(b"k", b"v", None, version)
        store.set_meta("incarnation", b"77")
        done = asyncio.Event()
        store.after_commit(lambda: (events.append("second"), done.set()))
        await asyncio.wait_for(done.wait(), 10)
        assert store.committed_key >= 3
        await store.close()
        return events

    assert asyncio.run(write()) == ["first", "second"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    state = store_at(path).load()
    sessions = {s.record.client_id: s for s in state.sessions}
    dev = sessions["dev"]
    assert dev.record.version == version
    assert dev.record.subscriptions[0][1].subscription_identifier == 7
    assert dev.incoming == [12]
    assert [
        (d.key, d.record.qos, d.record.packet_id, d.record.released) for d in dev.deliveries
    ] == [
        (1, 1, 0, False),
        (2, 2, 33, True),
    ]
    assert dev.deliveries[1].record.subscription_identifiers == (7,)
    assert sessions["other"].deliveries == []
    assert [(t, m.payload, c) for t, m, c in state.retained] == [("status", b"on", 123.5)]
    assert state.outbox == {"node-2": [(2, b"frame-2")]}
    assert state.routes == {"node-2": {"x/#"}}
    assert state.state[b"k"][0] == b"v"
    assert state.meta["incarnation"] == b"77"


def test_expiry_counts_down_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "node.db"

    async def write() -> None:
        store = store_at(path)
        store.start(asyncio.get_running_loop())
        store.add_delivery("dev", 1, codec.DeliveryRecord(wire(1, expiry_ms=60_000), 1, False))
        store.save_session(codec.SessionRecord("dev", 60, None, codec.Version(1, "n")))
        await store.close()

    asyncio.run(write())
    connection = __import__("sqlite3").connect(path)
    connection.execute("UPDATE messages SET saved_at = saved_at - 20")
    connection.commit()
    connection.close()
    (session,) = store_at(path).load().sessions
    left = session.deliveries[0].record.message.expiry_ms
    assert left is not None and 39_000 <= left <= 40_000


def test_a_file_of_another_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    store_at(path)._connection.execute("UPDATE meta SET value=? WHERE key='schema'", (b"99",))
    with pytest.raises(StoreError, match="schema version 99"):
        store_at(path)


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from broker import cluster_codec as codec
    from broker.config import StoreConfig
    from broker.mqtt import Properties
    from broker.store import DiskStore

    async def main():
        store = DiskStore(StoreConfig(mode="disk", path=Path(sys.argv[1])))
        store.start(asyncio.get_running_loop())
        for n in range(1, 201):
            message = codec.WireMessage("t", b"x", 1, False, Properties(), "n", None, n)
            store.add_delivery("dev", n, codec.DeliveryRecord(message, 1, False))
            store.after_commit(lambda n=n: print(n, flush=True))
            await asyncio.sleep(0)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_a_promise_made_after_commit_survives_sigkill(tmp_path: Path) -> None:
    """What an after-commit callback announced (a PUBACK, in the broker) is on disk even when
    the process is killed with SIGKILL right after."""
    path = tmp_path / "node.db"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    promised = 0
    try:
        for line in process.stdout:
            promised = int(line)
            if promised >= 50:
                break
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(10)
    assert promised >= 50
    (session_rows,) = [store_at(path)._connection.execute("SELECT COUNT(*) FROM deliveries")]
    assert session_rows.fetchone()[0] >= promised


def test_the_wills_of_connected_clients_come_back(tmp_path: Path) -> None:
    """A will set at CONNECT and not cleared (the connection outlived the process) is read
    back at the next start; one cleared is not, nor one replaced twice."""
    path = tmp_path / "node.db"

    async def write() -> None:
        store = store_at(path)
        store.load()
        store.start(asyncio.get_running_loop())
        store.set_will("gone", b"first")
        store.set_will("gone", b"second")
        store.set_will("left", b"will")
        store.clear_will("left")
        done = asyncio.get_running_loop().create_future()
        store.after_commit(lambda: done.set_result(None))
        await done
        await store.close()

    asyncio.run(write())
    assert store_at(path).load().wills == {"gone": b"second"}
