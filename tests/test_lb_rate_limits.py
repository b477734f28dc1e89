"""Accept rate limits (`maxconnrate`, `maxsessrate`, `maxsslrate`, `rate-limit sessions`):
the sliding-second counter against exact numbers and a model, its slots shared by forked
processes, the config keywords, and a running lb (one worker and two) that holds its
listeners at the limit while every connection is served in the end, none refused."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.ports import free_port
from lb.config import load_config_text
from lb.event_rate import MIN_DELAY, EventRate, RateWindow
from lb.runtime_api import STAT_COLUMNS
from lb.shared_counts import SharedCounts, listener_rate
from tests.harness import EchoBackend, client_context, run_lb, socat
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)


def _windows(count: int, workers: int = 1) -> tuple[memoryview, list[list[RateWindow]]]:
    """`count` windows of `workers` workers each: [window][worker]."""
    slots = memoryview(bytearray(8 * 2 * workers * count)).cast("q")
    return slots, [
        [RateWindow(slots, 2 * workers * index, workers, worker) for worker in range(workers)]
        for index in range(count)
    ]


# -- the counter ---------------------------------------------------------------------------


def test_window_counts_this_second_and_the_one_before() -> None:
    _, [[window]] = _windows(1)
    for moment in (100.1, 100.5, 100.9):
        window.add(moment)
    window.add(101.2)
    assert window.counts(100) == (3, 0)
    assert window.counts(101) == (1, 3)
    assert window.counts(102) == (0, 1)
    assert window.counts(103) == (0, 0)  # older seconds count nothing
    window.add(102.0)  # the even slot is reused: 100's count is gone, not added to
    assert window.counts(102) == (1, 1)


def test_workers_and_windows_are_summed() -> None:
    _, [[a0, a1], [b0, b1]] = _windows(2, workers=2)
    for window, times in ((a0, 2), (a1, 3), (b0, 1), (b1, 4)):
        for _ in range(times):
            window.add(50.5)
    assert a0.counts(50) == (5, 0) and b1.counts(50) == (5, 0)
    both = EventRate([a0, b0], limit=20)
    assert both.counts(50.9) == (10, 0)
    assert both.rate(50.9) == 10 and both.remain(50.9) == 10
    a1.clear_worker(1)  # worker 1 is gone: its events leave the window
    assert a0.counts(50) == (2, 0)


def test_previous_second_leaves_the_sliding_second_evenly() -> None:
    _, [[window]] = _windows(1)
    for _ in range(10):
        window.add(7.5)
    rate = EventRate([window], limit=10, label="test")
    assert rate.remain(7.9) == 0
    assert rate.estimate(8.25) == pytest.approx(7.5)  # 10 x 0.75 still inside
    assert rate.remain(8.25) == 3  # the limit less the rate rounded down, as HAProxy
    assert rate.remain(9.0) == 10
    assert rate.seen_max == 10


def test_no_limit_allows_everything() -> None:
    _, [[window]] = _windows(1)
    for _ in range(1000):
        window.add(3.0)
    rate = EventRate([window])
    assert rate.remain(3.5) > 1000 and rate.delay(3.5) == 0.0
    assert rate.rate(3.5) == 1000


@settings(max_examples=400, deadline=None)
@given(
    limit=st.integers(1, 50),
    previous=st.integers(0, 120),
    current=st.integers(0, 120),
    fraction=st.floats(0.0, 0.999),
)
def test_delay_is_when_one_more_event_is_allowed(
    limit: int, previous: int, current: int, fraction: float
) -> None:
    """After `delay` one more event is allowed; a little before it, none was (unless the
    wait is the minimum): the listener neither wakes in vain nor sleeps past its turn."""
    _, [[window]] = _windows(1)
    for _ in range(previous):
        window.add(10.5)
    for _ in range(current):
        window.add(11.5)
    rate = EventRate([window], limit=limit)
    now = 11.0 + fraction
    wait = rate.delay(now)
    if rate.remain(now) >= 1:
        assert wait == 0.0
        return
    assert wait >= MIN_DELAY
    assert rate.remain(now + wait) >= 1
    if wait > 3 * MIN_DELAY:
        assert rate.remain(now + wait - 2 * MIN_DELAY) == 0


def test_forked_workers_share_the_block() -> None:
    """The slots are MAP_SHARED: what a forked worker counts, the others read."""
    config = load_config_text(
        "global\n    nbthread 3\ndefaults\n    mode tcp\n"
        "frontend f\n    bind 127.0.0.1:1\n    bind 127.0.0.1:2\n    default_backend b\n"
        "backend b\n    server s 127.0.0.1:3\n"
    ).config
    assert config is not None
    block = SharedCounts.for_config(config)
    assert block is not None
    now = time.monotonic()
    children = []
    for worker in (2, 3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            window = block.rate_window(listener_rate("f", 1), worker)
            for _ in range(worker * 10):
                window.add(now)
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    mine = block.rate_window(listener_rate("f", 1), 1)
    mine.add(now)
    assert mine.counts(int(now)) == (51, 0)
    assert block.rate_window(listener_rate("f", 0), 1).counts(int(now)) == (0, 0)
    block.clear_worker(3)
    assert mine.counts(int(now)) == (21, 0)


# -- the configuration -----------------------------------------------------------------------

BASE = "defaults\n    mode tcp\nbackend b\n    server s 127.0.0.1:3\n"


def test_keywords_parse_and_inherit() -> None:
    result = load_config_text(
        "global\n    maxconnrate 100\n    maxsessrate 0\n    maxsslrate 50\n"
        "defaults\n    mode tcp\n    rate-limit sessions 20\n"
        "frontend a\n    bind 127.0.0.1:1\n    default_backend b\n"
        "frontend z\n    bind 127.0.0.1:2\n    rate-limit sessions 0\n    default_backend b\n"
        "backend b\n    server s 127.0.0.1:3\n"
    )
    config = result.config
    assert config is not None, result.diagnostics
    assert (config.global_.maxconnrate, config.global_.maxsessrate) == (100, None)
    assert config.global_.maxsslrate == 50
    assert [f.rate_limit_sessions for f in config.frontends] == [20, None]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("global\n    maxsslrate 5\n    maxsslrate 6\n", "already specified"),
        ("global\n    maxconnrate -1\n", "expects an integer >= 0, got '-1'"),
        ("global\n    maxconnrate\n", "expects an integer (per second)"),
        ("frontend f\n    rate-limit connections 5\n", "expects 'sessions <rate>'"),
        ("frontend f\n    rate-limit sessions ten\n", "got 'ten'"),
    ],
)
def test_bad_lines_name_the_line_and_keyword(text: str, message: str) -> None:
    result = load_config_text(text + BASE, "lb.cfg")
    errors = [d for d in result.diagnostics if d.is_error]
    assert errors, result.diagnostics
    assert message in errors[0].message
    assert errors[0].line is not None and errors[0].file == "lb.cfg"


def test_rate_limit_in_a_backend_is_ignored_with_a_warning() -> None:
    """As HAProxy: a frontend keyword in a backend is a warning, not an error."""
    result = load_config_text("backend c\n    rate-limit sessions 5\n" + BASE, "lb.cfg")
    assert result.config is not None
    [warning] = [d for d in result.diagnostics if d.keyword == "rate-limit"]
    assert warning.line == 2 and "no frontend capability" in warning.message


# -- a running lb ------------------------------------------------------------------------------


def _burst(port: int, count: int, connect: object = None) -> tuple[list[float], list[str]]:
    """`count` clients at once, each sends and waits for its echo: when each got it (seconds
    after the start, before the first connect) and what failed."""
    done: list[float] = []
    errors: list[str] = []
    start = time.monotonic()

    def client(number: int) -> None:
        payload = f"client {number}".encode()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                sock = connect(raw) if callable(connect) else raw
                sock.sendall(payload)
                if sock.recv(64) != payload:
                    raise OSError("no echo")
            done.append(time.monotonic() - start)
        except OSError as error:
            errors.append(f"{number}: {error!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return sorted(done), errors


def test_rate_limit_sessions_holds_the_listener(tmp_path: Path) -> None:
    """15 clients at once against `rate-limit sessions 5`: 5 are served at once, the others
    wait in the kernel's queue and are served as the rate allows (at 5 a second the last
    can not be served within a second of the first), none is refused; the limit and its
    pauses are shown and logged once."""
    port, other = free_port(), free_port()
    sock = tmp_path / "lb.sock"
    backend = EchoBackend(proxy=False)
    config = (
        f"global\n    stats socket {sock} mode 600 level admin\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend limited\n    bind 127.0.0.1:{port}\n    rate-limit sessions 5\n"
        "    default_backend echo\n"
        f"frontend free\n    bind 127.0.0.1:{other}\n    default_backend echo\n"
        f"backend echo\n    server e 127.0.0.1:{backend.port}\n"
    )
    try:
        with run_lb(config, tmp_path, port) as lb:
            lb.wait_output("stats socket listening", stream="stderr")
            done, errors = _burst(port, 15)
            assert errors == []
            assert len(done) == 15
            assert done[-1] >= 1.0, done  # seconds from the start: 5 now, 5 a second after
            # The other frontend has no limit of its own: 15 at once are served at once.
            free_done, free_errors = _burst(other, 15)
            assert free_errors == [] and len(free_done) == 15

            stat = socat(sock, "show stat").splitlines()
            column = {name: index for index, name in enumerate(STAT_COLUMNS)}
            rows = {tuple(line.split(",")[:2]): line.split(",") for line in stat[1:] if line}
            limited, free = rows[("limited", "FRONTEND")], rows[("free", "FRONTEND")]
            assert limited[column["rate_lim"]] == "5" and free[column["rate_lim"]] == ""
            assert 1 <= int(limited[column["rate_max"]]) <= 15
            assert limited[column["stot"]] == "15"
            activity = socat(sock, "show activity")
            paused = next(line for line in activity.splitlines() if line.startswith("rate_paused"))
            assert int(paused.split()[1]) >= 1
            info = socat(sock, "show info")
            assert "ConnRateLimit: 0\n" in info and "MaxConnRate: " in info
            lines = [line for line in lb.stderr.splitlines() if "'rate-limit sessions 5'" in line]
            assert len(lines) == 1 and "frontend limited" in lines[0], lines
            assert "reached: accepts pause" in lines[0]
    finally:
        backend.close()


def test_maxsslrate_is_one_limit_for_two_workers(pki: TestPKI, tmp_path: Path) -> None:
    """`maxsslrate 4` with two workers: their SSL accepts are counted together (a worker
    alone would take 4 a second itself), 12 TLS clients at once are all served; the plain
    bind of the same lb is not limited by it."""
    port, plain = free_port(), free_port()
    sock = tmp_path / "lb.sock"
    backend = EchoBackend(proxy=False)
    config = (
        f"global\n    nbthread 2\n    maxsslrate 4\n    stats socket {sock} level admin\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required\n"
        f"    bind 127.0.0.1:{plain}\n    default_backend echo\n"
        f"backend echo\n    server e 127.0.0.1:{backend.port}\n"
    )
    context = client_context(pki.device(3).cert, pki.device(3).key, pki.root)

    def tls(raw: socket.socket) -> socket.socket:
        return context.wrap_socket(raw, server_hostname="localhost")

    try:
        with run_lb(config, tmp_path, port) as lb:
            lb.wait_output("stats socket listening", stream="stderr")
            done, errors = _burst(port, 12, tls)
            assert errors == [] and len(done) == 12
            # 4 a second, passed by at most one batch per worker at once: 12 take more
            # than half a second whatever the timing.
            assert done[-1] >= 0.5, done
            plain_done, plain_errors = _burst(plain, 12)
            assert plain_errors == [] and len(plain_done) == 12
            info = socat(sock, "show info")
            assert "SslRateLimit: 4\n" in info
            max_ssl = int(info.split("MaxSslRate: ")[1].split()[0])
            assert 1 <= max_ssl <= 12
            assert "'maxsslrate 4' reached" in lb.stderr
    finally:
        backend.close()
