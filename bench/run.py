"""lb against HAProxy 2.6 on this machine: the same certificates, the same config text, the
same load generator; one table with the ratio lb / HAProxy.

    .venv/bin/python bench/run.py                      # every default figure, 3 repeats
    .venv/bin/python bench/run.py --only handshake,bulk --repeats 5 --duration 5
    .venv/bin/python bench/run.py --max-idle 100000    # also: idle connections within 8 GiB
    .venv/bin/python bench/run.py --balancers haproxy,lb,stdlib   # + the stdlib-ssl engine

Figures (each for the balancer's processes only: CPU is utime+stime from /proc summed over
the process tree, RSS is VmRSS summed over it):

- handshake: full mTLS handshakes (device cert + intermediate, verified up to the root),
  ECDSA P-256 and RSA 2048; each session is connect, handshake, a 4-byte echo, close.
  handshakes/s and balancer CPU µs per handshake.
- resume: resumed handshakes/s with TLS 1.3 tickets, TLS 1.2 tickets, TLS 1.2 session ids
  (and the fraction that really resumed).
- bulk: download through 1 connection and through 16: MB/s and balancer CPU s per GB.
- rr: 64-byte request/response over 200 connections: p50/p99 latency, CPU µs per round trip.
- idle: RSS KiB per idle mTLS connection at --idle connections (fresh balancer processes);
  with --max-idle N, whether N idle connections are held within 8 GiB.

The two balancers run side by side and are measured in turn (the order alternates between
repeats); each number is the median of --repeats. The balancer runs on CPU 0 and everything
else on the other CPUs (--no-pin to turn off). The generator's own CPU per operation gives its
ceiling (ops per generator CPU-second); it is printed beside each figure. Everything started
here runs in its own process group and is killed in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.loadgen import ClientFiles, Job, run_job  # noqa: E402
from bench.ports import free_port  # noqa: E402

VENV_BIN = Path(sys.executable).parent
HAPROXY = "/usr/sbin/haproxy"
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
TABLE_BEGIN = "<!-- bench table begin -->"
TABLE_END = "<!-- bench table end -->"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
MEMORY_LIMIT_KIB = 8 * 1024 * 1024  # the 8 GiB for --max-idle
BACKEND_PORTS = 8  # several servers: each (source, server) pair has its own port space
FIGURES = ("handshake", "resume", "bulk", "rr", "idle")

#: figure/metric -> (target ratio lb/HAProxy, True if higher is better)
TARGETS: dict[str, tuple[float, bool]] = {
    "handshake_ecdsa.cpu_us": (1.2, False),
    "handshake_rsa.cpu_us": (1.2, False),
    "resume_tls13.rate": (0.8, True),
    "resume_tls12_tickets.rate": (0.8, True),
    "resume_tls12_ids.rate": (0.8, True),
    "bulk_1.mb_s": (0.6, True),
    "bulk_16.mb_s": (0.6, True),
    "rr_200.cpu_us": (2.0, False),
    "idle.kib_per_conn": (1.0, False),
}


# -- processes -----------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """pid and every descendant, from /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    total = 0
    for member in children_of(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    total = 0
    for member in children_of(pid):
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * PAGE_KIB
        except OSError:
            continue
    return total


@dataclass
class Started:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


def start(
    name: str, args: list[str], directory: Path, cpus: set[int] | None, append: bool = False
) -> Started:
    """``append``: keep the log of an earlier process of this name (a restart)."""
    log = directory / f"{name}.log"
    with log.open("ab" if append else "wb") as output:
        popen = subprocess.Popen(
            args,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, killed as one in stop()
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if cpus:
        os.sched_setaffinity(popen.pid, cpus)
    return Started(name, popen, log)


def stop(process: Started) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.popen.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.popen.wait(5)
    # workers of a master may outlive it for a moment: the whole group goes
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_listening(port: int, process: Started, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log.read_text()[-3000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{process.name} does not listen on {port}:\n{process.log.read_text()}")


# -- certificates and configuration --------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    directory: Path
    allinone: Path
    intermediate: Path
    root: Path
    client: ClientFiles


def make_pki(directory: Path, key_type: str) -> Pki:
    subprocess.run(
        [str(VENV_BIN / "lb-pki"), "demo", "--dir", str(directory), "--key-type", key_type],
        check=True,
        capture_output=True,
        timeout=120,
    )
    chain = directory / "device-chain.pem"
    chain.write_bytes(
        (directory / "device-0001.pem").read_bytes()
        + (directory / "CaIntermediate.pem").read_bytes()
    )
    return Pki(
        directory,
        directory / "server-allinone.pem",
        directory / "CaIntermediate.pem",
        directory / "CaRoot.pem",
        ClientFiles(
            str(chain), str(directory / "device-0001-key.pem"), str(directory / "CaRoot.pem")
        ),
    )


@dataclass
class Balancer:
    """One balancer's ports (per frontend) and, once started, its process."""

    name: str
    ports: dict[str, int]
    process: Started | None = None


def config_text(
    ports: dict[str, int], pkis: dict[str, Pki], backend_ports: list[int], args: argparse.Namespace
) -> str:
    """The one haproxy.cfg shape both balancers run (seed 004's bind line)."""
    lines = [
        "global",
        f"    maxconn {args.maxconn}",
        f"    nbthread {args.nbthread}",
        "    tune.ssl.cachesize 20000",
        "    tune.ssl.lifetime 300",
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 600s",
        "    timeout server 600s",
        "",
    ]
    for frontend, pki in pkis.items():
        lines += [
            f"frontend {frontend}",
            f"    bind 127.0.0.1:{ports[frontend]} ssl crt {pki.allinone}"
            f" ca-file {pki.intermediate} ca-verify-file {pki.root} verify required",
            "    default_backend servers",
            "",
        ]
    lines += ["backend servers", "    balance roundrobin"]
    lines += [f"    server s{i} 127.0.0.1:{p} {args.proxy}" for i, p in enumerate(backend_ports, 1)]
    return "\n".join(lines) + "\n"


def balancer_command(
    name: str, config: Path, pkis: dict[str, Pki], ports: dict[str, int]
) -> list[str]:
    if name == "haproxy":
        return [HAPROXY, "-db", "-f", str(config)]
    if name == "lb":
        return [str(VENV_BIN / "lb"), "-db", "-q", "-f", str(config)]
    if name == "stdlib":
        command = [sys.executable, str(ROOT / "bench" / "stdlib_proxy.py"), "--config", str(config)]
        return command
    raise ValueError(name)


# -- measurements --------------------------------------------------------------------------


def measure(
    job: Job, pid: int, hold: Callable[[], None] | None = None
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    marks: dict[str, float] = {}

    def opened() -> None:
        marks["cpu0"], marks["t0"] = cpu_seconds(pid), time.monotonic()

    def done() -> None:
        marks["cpu1"], marks["t1"] = cpu_seconds(pid), time.monotonic()

    results = run_job(job, opened, done, hold)
    ops = sum(r["ops"] for r in results)
    rate = sum(r["ops"] / r["elapsed"] for r in results if r["elapsed"] > 0)
    generator_cpu = sum(r["cpu"] for r in results)
    balancer_cpu = marks["cpu1"] - marks["cpu0"]
    values = {
        "ops": float(ops),
        "rate": rate,
        "cpu_us": balancer_cpu / ops * 1e6 if ops else float("nan"),
        "errors": float(sum(r["errors"] for r in results)),
        "gen_ceiling": ops / generator_cpu if generator_cpu else float("nan"),
        "balancer_cpu_s": balancer_cpu,
        "window_s": marks["t1"] - marks["t0"],
    }
    return values, results


def figure_jobs(args: argparse.Namespace, pkis: dict[str, Pki]) -> dict[str, Job]:
    ec, rsa = pkis["fe_ec"].client, pkis["fe_rsa"].client
    d = args.duration
    base = Job("handshake", "127.0.0.1", 0, ec, workers=2, threads=8, duration=d)
    jobs: dict[str, Job] = {}
    if "handshake" in args.only:
        jobs["handshake_ecdsa"] = replace(base, extra={"frontend": "fe_ec"})
        jobs["handshake_rsa"] = replace(base, files=rsa, extra={"frontend": "fe_rsa"})
    if "resume" in args.only:
        resume = replace(base, kind="resume", extra={"frontend": "fe_ec"})
        jobs["resume_tls13"] = resume
        jobs["resume_tls12_tickets"] = replace(resume, tls_version="1.2")
        jobs["resume_tls12_ids"] = replace(resume, tls_version="1.2", tickets=False)
    if "bulk" in args.only:
        bulk = replace(base, kind="bulk", extra={"frontend": "fe_ec"})
        jobs["bulk_1"] = replace(bulk, workers=1, threads=1)
        jobs["bulk_16"] = replace(bulk, workers=2, threads=8)
    if "rr" in args.only:
        jobs["rr_200"] = replace(
            base, kind="rr", workers=2, threads=100, extra={"frontend": "fe_ec"}
        )
    return jobs


def summarize(
    name: str, values: dict[str, float], results: list[dict[str, Any]]
) -> dict[str, float]:
    if name.startswith("bulk"):
        total = sum(r["bytes"] for r in results)
        seconds = max(r["elapsed"] for r in results)
        values["mb_s"] = total / seconds / 1e6
        values["cpu_s_per_gb"] = values["balancer_cpu_s"] / (total / 1e9) if total else float("nan")
        values["gen_ceiling"] = total / 1e6 / sum(r["cpu"] for r in results)
    if name.startswith("resume"):
        values["resumed"] = sum(r["reused"] for r in results) / max(1.0, values["ops"])
    if name.startswith("rr"):
        latencies = array("d")
        for r in results:
            latencies.frombytes(r["latencies"])
        ordered = sorted(latencies)
        if ordered:
            values["p50_ms"] = ordered[len(ordered) // 2] * 1000
            values["p99_ms"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    return values


# -- the run -------------------------------------------------------------------------------


def raise_limits() -> int:
    """Raise RLIMIT_NOFILE as far as allowed (children inherit it); the limit in force.
    Raising the hard limit needs CAP_SYS_RESOURCE, which some containers drop."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (1_048_576, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connections_allowed(fd_limit: int) -> int:
    """Sessions one balancer process can hold: two descriptors each, and some spare."""
    return (fd_limit - 200) // 2


@contextlib.contextmanager
def port_range(wide: bool) -> Iterator[None]:
    """For --max-idle: the whole ephemeral range (restored afterwards)."""
    path = Path("/proc/sys/net/ipv4/ip_local_port_range")
    old = path.read_text() if wide else ""
    if wide:
        try:
            path.write_text("1024 65000\n")
        except OSError:
            pass
    try:
        yield
    finally:
        if wide and old:
            with contextlib.suppress(OSError):
                path.write_text(old)


def run(args: argparse.Namespace) -> dict[str, Any]:
    fd_limit = raise_limits()
    if args.maxconn is None:
        args.maxconn = min(250_000, connections_allowed(fd_limit))
    for wanted in (args.idle, args.max_idle):
        if wanted > connections_allowed(fd_limit) * args.nbthread:
            raise SystemExit(
                f"{wanted} idle connections need RLIMIT_NOFILE >= {2 * wanted + 200} per "
                f"balancer process; the limit here is {fd_limit} (raising it needs "
                "CAP_SYS_RESOURCE)"
            )
    args.fd_limit = fd_limit
    all_cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin and args.nbthread == 1 and len(all_cpus) > 1
    balancer_cpus = {all_cpus[0]} if pin else None
    other_cpus = set(all_cpus[1:]) if pin else None
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)  # this process and the generator it forks
    work = Path(tempfile.mkdtemp(prefix="lb-bench-", dir=args.workdir))
    started: list[Started] = []
    runs: list[dict[str, Any]] = []
    try:
        pkis = {"fe_ec": make_pki(work / "ec", "ec"), "fe_rsa": make_pki(work / "rsa", "rsa2048")}
        backend_ports = [free_port() for _ in range(BACKEND_PORTS)]
        ready = work / "backend.ready"
        backend = start(
            "backend",
            [
                sys.executable,
                str(ROOT / "bench" / "backend.py"),
                "--ports",
                ",".join(map(str, backend_ports)),
                "--ready-file",
                str(ready),
            ],
            work,
            other_cpus,
        )
        started.append(backend)
        wait_listening(backend_ports[-1], backend)

        def launch(name: str, tag: str) -> Balancer:
            balancer = Balancer(name, {f: free_port() for f in pkis})
            config = work / f"{name}-{tag}.cfg"
            config.write_text(config_text(balancer.ports, pkis, backend_ports, args))
            process = start(
                f"{name}-{tag}",
                balancer_command(name, config, pkis, balancer.ports),
                work,
                balancer_cpus,
            )
            started.append(process)
            balancer.process = process
            for port in balancer.ports.values():
                wait_listening(port, process)
            return balancer

        jobs = figure_jobs(args, pkis)
        balancers = [launch(name, "main") for name in args.balancers] if jobs else []
        for repeat in range(args.repeats):
            order = balancers if repeat % 2 == 0 else balancers[::-1]
            for figure, job in jobs.items():
                for balancer in order:
                    assert balancer.process is not None
                    port = balancer.ports[job.extra["frontend"]]
                    values, results = measure(replace(job, port=port), balancer.process.pid)
                    values = summarize(figure, values, results)
                    runs.append(
                        {"repeat": repeat, "figure": figure, "balancer": balancer.name, **values}
                    )
                    progress(figure, balancer.name, repeat, values)
            if "idle" in args.only:
                for name in args.balancers if repeat % 2 == 0 else args.balancers[::-1]:
                    values = idle_run(name, launch, f"idle{repeat}", args.idle, started, pkis)
                    runs.append({"repeat": repeat, "figure": "idle", "balancer": name, **values})
                    progress("idle", name, repeat, values)
        if args.max_idle:
            with port_range(True):
                for name in args.balancers:
                    values = idle_run(name, launch, "max", args.max_idle, started, pkis, sources=16)
                    runs.append({"repeat": 0, "figure": "idle_max", "balancer": name, **values})
                    progress("idle_max", name, 0, values)
    finally:
        for process in reversed(started):
            stop(process)
    return report(runs, args)


def idle_run(
    name: str,
    launch: Callable[[str, str], Balancer],
    tag: str,
    count: int,
    started: list[Started],
    pkis: dict[str, Pki],
    sources: int = 4,
) -> dict[str, float]:
    balancer = launch(name, tag)
    assert balancer.process is not None
    try:
        time.sleep(0.5)
        before = rss_kib(balancer.process.pid)
        workers = 4 if count > 20000 else 2
        job = Job(
            "idle",
            "127.0.0.1",
            balancer.ports["fe_ec"],
            pkis["fe_ec"].client,
            workers=workers,
            threads=16,
            duration=max(120.0, count / 200),
            count=count // workers,
            sources=tuple(f"127.0.0.{i}" for i in range(2, 2 + sources)),
            # opening connections is not measured: the generator may use every CPU
            extra={
                "cpus": sorted(os.sched_getaffinity(balancer.process.pid) | os.sched_getaffinity(0))
            },
        )
        after: dict[str, float] = {}

        def hold() -> None:
            time.sleep(1.0)
            after["rss"] = rss_kib(balancer.process.pid)  # type: ignore[union-attr]

        values, _results = measure(job, balancer.process.pid, hold)
        held = values["ops"]
        grown = after["rss"] - before
        return {
            "held": held,
            "errors": values["errors"],
            "rss_before_kib": float(before),
            "rss_kib": after["rss"],
            "kib_per_conn": grown / held if held else float("nan"),
            "within_8gib": float(after["rss"] <= MEMORY_LIMIT_KIB),
            "connect_rate": values["rate"],
        }
    finally:
        stop(balancer.process)
        started.remove(balancer.process)


def progress(figure: str, balancer: str, repeat: int, values: dict[str, float]) -> None:
    shown = {k: round(v, 3) for k, v in values.items() if k not in ("ops",)}
    print(f"[{repeat}] {figure:22} {balancer:8} {shown}", file=sys.stderr, flush=True)


# -- reporting -----------------------------------------------------------------------------

#: figure -> metrics shown in the table, with units
SHOWN: dict[str, list[tuple[str, str]]] = {
    "handshake_ecdsa": [("rate", "handshakes/s"), ("cpu_us", "CPU µs/handshake")],
    "handshake_rsa": [("rate", "handshakes/s"), ("cpu_us", "CPU µs/handshake")],
    "resume_tls13": [
        ("rate", "resumed/s"),
        ("cpu_us", "CPU µs/handshake"),
        ("resumed", "fraction resumed"),
    ],
    "resume_tls12_tickets": [
        ("rate", "resumed/s"),
        ("cpu_us", "CPU µs/handshake"),
        ("resumed", "fraction resumed"),
    ],
    "resume_tls12_ids": [
        ("rate", "resumed/s"),
        ("cpu_us", "CPU µs/handshake"),
        ("resumed", "fraction resumed"),
    ],
    "bulk_1": [("mb_s", "MB/s"), ("cpu_s_per_gb", "CPU s/GB")],
    "bulk_16": [("mb_s", "MB/s"), ("cpu_s_per_gb", "CPU s/GB")],
    "rr_200": [
        ("rate", "round trips/s"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("cpu_us", "CPU µs/round trip"),
    ],
    "idle": [("kib_per_conn", "RSS KiB/conn"), ("held", "connections held")],
    "idle_max": [
        ("held", "connections held"),
        ("rss_kib", "RSS KiB"),
        ("within_8gib", "within 8 GiB (1=yes)"),
    ],
}


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for run_ in runs:
        figure, balancer = run_["figure"], run_["balancer"]
        for key, value in run_.items():
            if isinstance(value, (int, float)) and key != "repeat":
                table.setdefault(figure, {}).setdefault(key, {}).setdefault(balancer, [])  # type: ignore[arg-type]
                table[figure][key][balancer].append(value)  # type: ignore[attr-defined]
    return {
        figure: {
            key: {balancer: statistics.median(values) for balancer, values in by.items()}  # type: ignore[arg-type]
            for key, by in metrics.items()
        }
        for figure, metrics in table.items()
    }


def format_table(result: dict[str, Any]) -> str:
    balancers: list[str] = result["balancers"]
    others = [b for b in balancers if b != "haproxy"]
    header = [
        "figure",
        "metric",
        *balancers,
        *(f"{b} / haproxy" for b in others),
        "target",
        "gen ceiling",
    ]
    rows = [header, ["---"] * len(header)]
    for figure, metrics in SHOWN.items():
        if figure not in result["medians"]:
            continue
        for metric, label in metrics:
            values = result["medians"][figure].get(metric, {})
            row = [figure, label]
            row += [_number(values.get(b)) for b in balancers]
            base = values.get("haproxy")
            for other in others:
                value = values.get(other)
                row.append(f"{value / base:.2f}" if value is not None and base else "")
            target = TARGETS.get(f"{figure}.{metric}")
            if target is None:
                row.append("")
            else:
                ratio = values.get("lb", float("nan")) / base if base else float("nan")
                met = ratio >= target[0] if target[1] else ratio <= target[0]
                row.append(f"{'≥' if target[1] else '≤'} {target[0]} {'met' if met else 'MISSED'}")
            ceiling = result["medians"][figure].get("gen_ceiling", {})
            row.append(
                _number(min(ceiling.values())) if ceiling and metric in ("rate", "mb_s") else ""
            )
            rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _number(value: float | None) -> str:
    if value is None or value != value:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    uname = " ".join(platform.uname())
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"uname": uname, "nproc": os.cpu_count(), "haproxy": haproxy_version()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "balancers": args.balancers,
        "runs": runs,
        "medians": medians(runs),
    }
    result["table"] = format_table(result)
    return result


def source_tree() -> dict[str, Any]:
    """The commit the processes of a run come from, the files of lb/, broker/ and demo/
    changed from it, and PYTHONPATH (an A/B runs a tree through it). The processes import
    the tree as it is when each starts: an edit during a fleet run changes the code of the
    phases started after it, so a run records this at its start and at its end."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "lb", "broker", "demo"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        commit, status = "", []
    return {
        "commit": commit or None,
        "changed": sorted(line[3:] for line in status),
        "pythonpath": os.environ.get("PYTHONPATH"),
    }


def source_span(start: dict[str, Any], what: str) -> dict[str, Any]:
    """{"start", "end"} of a run that began at ``start`` (source_tree()), with a warning when
    the tree changed meanwhile (processes started after the edit ran other code)."""
    end = source_tree()
    if end != start:
        print(
            f"{what}: WARNING the tree changed during the run ({start} -> {end}): its parts "
            "may have run different code",
            file=sys.stderr,
            flush=True,
        )
    return {"start": start, "end": end}


def haproxy_version() -> str:
    try:
        output = subprocess.run(
            [HAPROXY, "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return "not installed"
    return output.splitlines()[0] if output else ""


def write_table(begin: str, end: str, body: str) -> None:
    """Put `body` between the `begin` and `end` markers of bench/README.md (append both when
    they are not there yet), leaving the rest of the file as it is."""
    text = README.read_text() if README.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text + "\n" + block + "\n"
    README.write_text(text)


def update_readme(result: dict[str, Any]) -> None:
    write_table(
        TABLE_BEGIN,
        TABLE_END,
        f"{result['date']} — `{result['machine']['uname']}`, nproc "
        f"{result['machine']['nproc']}, {result['machine']['haproxy']}; "
        f"medians of {result['settings']['repeats']} repeats, {result['settings']['duration']} s "
        f"each, nbthread {result['settings']['nbthread']}.\n\n{result['table']}",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="lb vs HAProxy 2.6 on this machine")
    parser.add_argument(
        "--only", default=",".join(FIGURES), help=f"comma-separated of {','.join(FIGURES)}"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument(
        "--idle",
        type=int,
        default=9_000,
        help="idle connections for the RSS figure (10000 needs RLIMIT_NOFILE > 20200)",
    )
    parser.add_argument(
        "--max-idle", type=int, default=0, help="also hold this many idle connections (e.g. 100000)"
    )
    parser.add_argument("--balancers", default="haproxy,lb", help="haproxy,lb[,stdlib]")
    parser.add_argument("--nbthread", type=int, default=1)
    parser.add_argument("--maxconn", type=int, help="global maxconn (default: what fds allow)")
    parser.add_argument(
        "--proxy", default="send-proxy-v2", help="server option (e.g. send-proxy-v2-ssl-cn)"
    )
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not pin the balancer to CPU 0"
    )
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/<date>.json)")
    parser.add_argument("--workdir", type=Path, help="parent of the scratch folder (default /tmp)")
    parser.add_argument(
        "--readme", action="store_true", help="write the table into bench/README.md"
    )
    parser.add_argument(
        "--suite",
        choices=("lb", "broker", "fleet", "all"),
        default="lb",
        help="lb (this suite), broker (bench/broker_bench.py) or fleet (bench/fleet.py), "
        "each with its own flags after it, or all (lb then broker)",
    )
    args = parser.parse_args(argv)
    args.only = [f for f in args.only.split(",") if f]
    unknown = set(args.only) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")
    args.balancers = [b for b in args.balancers.split(",") if b]
    return args


def main(argv: list[str] | None = None) -> int:
    # --suite lb (default) | broker | fleet | all: the broker suite (bench/broker_bench.py, our
    # MQTT broker vs mosquitto) and the fleet suite (bench/fleet.py) take their own flags after
    # `--suite NAME`; `all` runs the broker suite with its defaults after the lb suite.
    suite_parser = argparse.ArgumentParser(add_help=False)
    suite_parser.add_argument("--suite", choices=("lb", "broker", "fleet", "all"), default="lb")
    suite, rest = suite_parser.parse_known_args(argv)
    if suite.suite == "broker":
        from bench import broker_bench  # noqa: PLC0415 (it imports this module)

        return broker_bench.main(rest)
    if suite.suite == "fleet":
        # fleet scale (bench/fleet.py): a scenario, then its flags, e.g. `ramp --devices N`
        from bench import fleet  # noqa: PLC0415 (it imports this module)

        return fleet.main(rest)
    args = parse_args(rest)
    source = source_tree()
    result = run(args)
    result["source"] = source_span(source, "bench")
    output = args.output
    if output is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        output = RESULTS / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    serializable = {
        **result,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in result["settings"].items()
        },
    }
    output.write_text(json.dumps(serializable, indent=2) + "\n")
    print(result["table"])
    print(f"\nresults: {output}", file=sys.stderr)
    if args.readme:
        update_readme(result)
    if suite.suite == "all":
        from bench import broker_bench  # noqa: PLC0415 (it imports this module)

        return broker_bench.main(["--readme"] if args.readme else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
