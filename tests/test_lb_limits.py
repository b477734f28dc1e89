"""lb and the file limit (lb.limits), beside HAProxy 2.6 on the same configuration text.

`fd-hard-limit` sets the limit in the configuration (both HAProxy and lb honour it), so
these tests behave the same on any machine whose own limit is at least that high, and no
test changes the limits of the process that runs it.

- An explicit maxconn the limit cannot serve: `haproxy -c` says nothing, `lb -c` warns with
  the numbers; both refuse to start ("Cannot raise FD limit to N, limit is L.").
- `no strict-limits`: lb runs with the maxconn that fits (HAProxy keeps one it cannot serve);
  connections beyond it wait in the kernel's queue and are served as sessions end, no
  accept fails, the health checks keep the server UP.
- No maxconn: what the limit allows, as HAProxy; `nbthread` workers share a global maxconn.
- Out of files anyway (here: runtime API clients, which are not sessions): accepts pause and
  resume with one line each way, a check that cannot get a socket leaves the server as it
  was, nothing crashes.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.config import load_config_text
from lb.frontend import RESOURCE_BACKOFF
from lb.limits import MIN_AUTO_MAXCONN, PER_SESSION, fixed_descriptors, plan
from tests.harness import (
    HAPROXY,
    VENV_BIN,
    EchoBackend,
    Process,
    haproxy_available,
    socat,
    start_process,
    wait_port,
)

pytestmark = pytest.mark.timeout(120)


def _config(
    port: int, backend_port: int, global_lines: str, stats: Path | None = None, check: str = ""
) -> str:
    stats_line = f"    stats socket {stats} level admin\n" if stats is not None else ""
    return (
        f"global\n{global_lines}{stats_line}    log stdout format raw local0\n"
        "defaults\n    mode tcp\n    log global\n    option tcplog\n"
        "    option log-health-checks\n"
        "    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
        f"frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n"
        f"backend be\n    server s1 127.0.0.1:{backend_port}{check}\n"
    )


def _planned(text: str, limit: int) -> tuple[int, int]:
    """(fixed descriptors, each worker's maxconn) as lb.limits computes them."""
    config = load_config_text(text).config
    assert config is not None
    files = plan(config, limit)
    return fixed_descriptors(config), files.worker_maxconn


def _info(path: Path) -> dict[str, str]:
    lines = socat(path, "show info").splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


@contextlib.contextmanager
def _lb(text: str, directory: Path, port: int, *flags: str) -> Iterator[Process]:
    path = directory / "lb.cfg"
    path.write_text(text)
    process = start_process([str(VENV_BIN / "lb"), *flags, "-f", str(path)], directory, "lb")
    try:
        # A master says "ready" once its workers accept; the stats socket comes last.
        process.wait_output("ready" if "-db" not in flags else "listening on", 30)
        if "stats socket" in text:
            process.wait_output("stats socket listening on", 30)
        yield process
    finally:
        process.stop()


def _run(args: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.skipif(not haproxy_available(), reason="haproxy not installed")
def test_maxconn_out_of_reach_is_refused_as_haproxy_does(tmp_path: Path) -> None:
    port = free_port()
    text = _config(port, 1, "    maxconn 500000\n    fd-hard-limit 20000\n")
    path = tmp_path / "limits.cfg"
    path.write_text(text)
    fixed, _ = _planned(text, 20000)
    needed = fixed + PER_SESSION * 500000

    # -c: HAProxy says nothing; lb warns with the numbers and what to change. Both exit 0.
    haproxy_check = _run([HAPROXY, "-c", "-f", str(path)])
    assert haproxy_check.returncode == 0, haproxy_check.stderr
    assert "maxconn" not in haproxy_check.stderr
    lb_check = _run([str(VENV_BIN / "lb"), "-c", "-f", str(path)])
    assert lb_check.returncode == 0, lb_check.stderr
    assert re.search(
        r"\[WARNING\] +\(\d+\) : config : parsing \[.*limits.cfg:2\] : 'maxconn'", lb_check.stderr
    )
    for words in (
        f"{needed} per worker",
        "a process may open 20000",
        "LimitNOFILE=",
        "'ulimit -n'",
        f"lower 'maxconn' to {(20000 - fixed) // 2}",
        "'nbthread 51'",
        "lb would refuse to start",
    ):
        assert words in lb_check.stderr, (words, lb_check.stderr)

    # A start: both refuse, in the same words (HAProxy's maxsock counts its own fixed part).
    haproxy_start = _run([HAPROXY, "-db", "-f", str(path)])
    assert haproxy_start.returncode == 1
    assert re.search(
        r"\[ALERT\] .*Cannot raise FD limit to \d+, limit is 20000\.", haproxy_start.stderr
    )
    lb_start = _run([str(VENV_BIN / "lb"), "-db", "-f", str(path)])
    assert lb_start.returncode == 1, lb_start.stderr
    assert f"[lb.main()] Cannot raise FD limit to {needed}, limit is 20000." in lb_start.stderr
    assert "'nbthread 51'" in lb_start.stderr
    assert "listening" not in lb_start.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_no_strict_limits_runs_with_what_fits(tmp_path: Path) -> None:
    """Sessions beyond the lowered maxconn wait in the kernel's queue and are served as
    others end; nothing fails for want of files and the checks keep the server UP."""
    backend = EchoBackend(proxy=False)
    port = free_port()
    stats = tmp_path / "lb.sock"
    text = _config(
        port,
        backend.port,
        "    maxconn 1000\n    fd-hard-limit 120\n    no strict-limits\n",
        stats,
        " check inter 200ms fall 2 rise 2",
    )
    fixed, worker_maxconn = _planned(text, 120)
    assert worker_maxconn == (120 - fixed) // PER_SESSION
    clients: list[socket.socket] = []
    try:
        with _lb(text, tmp_path, port) as lb:
            assert "Cannot raise FD limit to 2" in lb.stderr
            assert f"'no strict-limits': running with maxconn {worker_maxconn}" in lb.stderr
            info = _info(stats)
            assert (info["Maxconn"], info["Ulimit-n"]) == (str(worker_maxconn), "120")
            for _ in range(worker_maxconn + 8):
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                client.sendall(b"ping")
                clients.append(client)
            served = [c for c in clients[:worker_maxconn] if c.recv(16) == b"ping"]
            assert len(served) == worker_maxconn
            waiting = clients[worker_maxconn:]
            for client in waiting:  # accepted by the kernel, not by lb
                client.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    client.recv(16)
            time.sleep(1.0)  # five health checks at the limit
            for client in clients[:8]:
                client.close()
            for client in waiting:
                client.settimeout(10)
                assert client.recv(16) == b"ping"
            output = lb.output()
    finally:
        for client in clients:
            client.close()
        backend.close()
    assert "Too many" not in output and "Traceback" not in output, output
    assert " is DOWN" not in output and "not run" not in output, output


def test_unset_maxconn_is_what_the_limit_allows_and_workers_share_it(tmp_path: Path) -> None:
    port = free_port()
    stats = tmp_path / "lb.sock"
    text = _config(port, 1, "    fd-hard-limit 400\n", stats)
    fixed, worker_maxconn = _planned(text, 400)
    assert worker_maxconn == (400 - fixed) // PER_SESSION > MIN_AUTO_MAXCONN
    with _lb(text, tmp_path, port):
        assert _info(stats)["Maxconn"] == str(worker_maxconn)

    # 300 sessions need two workers under 400 files each: one is refused, two share them.
    refused = _config(port, 1, "    fd-hard-limit 400\n    maxconn 300\n", stats)
    path = tmp_path / "one.cfg"
    path.write_text(refused)
    start = _run([str(VENV_BIN / "lb"), "-f", str(path)])
    assert start.returncode == 1
    assert f"Cannot raise FD limit to {fixed + 600}, limit is 400." in start.stderr
    assert "'nbthread 2' (150 sessions each)" in start.stderr
    shared = _config(port, 1, "    fd-hard-limit 400\n    maxconn 300\n    nbthread 2\n", stats)
    with _lb(shared, tmp_path, port):
        wait_port(port)
        assert _info(stats)["Maxconn"] == "300"
        # Each worker may hold what its files allow; the shared count bounds the sum.
        assert _info(stats)["Maxsock"] == str(fixed + PER_SESSION * ((400 - fixed) // 2))


def test_out_of_files_pauses_accepts_and_spares_the_checks(tmp_path: Path) -> None:
    """Runtime API clients are not sessions: 120 of them, connected first, take files the
    sessions would need. The session that finds none waits (one line when accepting
    pauses, one when it resumes), and the health checks that cannot get a socket are not
    held against the server. (Within the runtime API's 10 s idle timeout.)"""
    backend = EchoBackend(proxy=False)
    port = free_port()
    stats = tmp_path / "lb.sock"
    text = _config(
        port, backend.port, "    fd-hard-limit 300\n", stats, " check inter 100ms fall 2 rise 2"
    )
    _, worker_maxconn = _planned(text, 300)
    clients: list[socket.socket] = []
    hogs: list[socket.socket] = []
    late: list[socket.socket] = []
    try:
        with _lb(text, tmp_path, port, "-db") as lb:
            for _ in range(120):
                hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                hog.connect(str(stats))
                hogs.append(hog)
            refused = 0
            for _ in range(worker_maxconn):
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                client.sendall(b"ping")
                # Well inside lb's backoff (RESOURCE_BACKOFF, 1 s): a client waiting for a
                # file is told from a served one before lb tries again, which would serve it
                # or refuse it (a second burst). A slow answer while lb has not paused is
                # waited for.
                client.settimeout(RESOURCE_BACKOFF * 0.4)
                clients.append(client)
                try:
                    answer = client.recv(16)
                except TimeoutError:
                    if "no new session until one ends" in lb.output():
                        clients.pop()
                        late.append(client)  # accepted by the kernel, waiting for a file
                        break
                    client.settimeout(10)
                    answer = client.recv(16)
                # b"": accepted with the last file, none left for its server (SC).
                assert answer in (b"ping", b""), answer
                refused += answer == b""
            assert refused <= 2
            assert late, "lb served every session although its files were taken"
            assert len(clients) < worker_maxconn - 10
            lb.wait_output("no new session until one ends", 5)
            time.sleep(0.5)  # five health checks while out of files
            for hog in hogs:
                hog.close()
            hogs.clear()
            late[0].settimeout(10)
            assert late[0].recv(16) == b"ping"
            lb.wait_output("accepting up to maxconn again", 5)
            activity = socat(stats, "show activity")
            output = lb.output()
    finally:
        for sock in (*clients, *hogs, *late):
            sock.close()
        backend.close()
    assert output.count("no new session until one ends") == 1, output
    assert output.count("accepting up to maxconn again") == 1, output
    # Once in lb's own log (the `log` target says it again, as HAProxy's check events).
    assert output.count("lb.checks: Health check for server be/s1 not run, reason: Socket") == 1

    counted = re.search(r"^resource_errors: (\d+) ", activity, re.MULTILINE)
    assert counted is not None and int(counted.group(1)) >= 1, activity
    assert " is DOWN" not in output and "Traceback" not in output, output
