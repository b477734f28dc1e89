"""Where an idle mTLS session's memory goes in lb: KiB per session, split into the Python
heap (tracemalloc inside the lb process) and the rest (OpenSSL, libuv, malloc overhead).

    .venv/bin/python bench/idle_memory.py --sessions 4000
    .venv/bin/python bench/idle_memory.py --sessions 4000 --balancers lb,haproxy --top 20

Each balancer is started fresh on the same certificates and config shape as bench/run.py
(seed 004's bind line, round robin, send-proxy-v2 to bench/backend.py), then the load
generator opens --sessions mTLS sessions that each send one 4-byte ping, get it echoed, and
stay open. Figures, per session (growth from before the first connection to one second
after the last, divided by the sessions held):

- rss_kib: VmRSS of the balancer's process tree, from a run *without* tracemalloc;
- python_kib: the Python heap as tracemalloc counts it (a second lb run with
  `tracemalloc.start()`; the traced run's RSS is not used, tracemalloc's own tables grow it);
- malloc_kib: bytes in use in glibc's malloc (mallinfo2: uordblks + hblkhd), which holds
  OpenSSL's allocations, libuv's handles and Python objects above 512 bytes (in the traced
  run it includes tracemalloc's own tables); heap_free_kib: bytes malloc holds free in its
  arenas (fragmentation: room kept from freed blocks);
- closed_kib: what stays of the RSS growth once every session has closed (two seconds after
  the load generator closed them), per session that was held: allocator bloat.

Both lb runs go through `--serve` (this file as lb's entry point): a thread waits for
request files in a scratch folder and answers each with the malloc counters (and, in the
traced run, a tracemalloc snapshot), so the event loop itself is not touched. The top
allocation sites of the growth (tracemalloc's compare_to) are printed, by source line, with
--frames of traceback. `--lb-root DIR` runs the lb package found in DIR (another
checkout) for A/B comparisons.
Prints JSON. Every process it starts has its own process group and is killed in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.loadgen import Job, run_job  # noqa: E402
from bench.run import (  # noqa: E402
    BACKEND_PORTS,
    Started,
    balancer_command,
    config_text,
    connections_allowed,
    free_port,
    make_pki,
    raise_limits,
    rss_kib,
    start,
    stop,
    wait_listening,
)

#: How long a snapshot request may take (a snapshot of ~10k sessions takes a few seconds).
SNAPSHOT_TIMEOUT = 120.0
#: Seconds between the load generator closing its sessions and the closed_kib sample.
CLOSE_SETTLE = 2.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_counters() -> tuple[int, int]:
    """(bytes handed out by glibc's malloc: arenas + mmapped blocks, bytes free in its
    arenas); (0, 0) elsewhere."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return 0, 0
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd), int(info.fordblks)


def malloc_in_use() -> int:
    return malloc_counters()[0]


# -- inside lb: --serve ------------------------------------------------------------------------


def _answer_requests(directory: Path, traced: bool) -> None:
    """Answer `<tag>.request` files with `<tag>.json` and, traced, `<tag>.snapshot`
    (daemon thread)."""
    while True:
        for request in sorted(directory.glob("*.request")):
            tag = request.stem
            in_use, free = malloc_counters()
            info: dict[str, Any] = {"malloc_in_use": in_use, "malloc_free": free}
            if traced:
                snapshot = tracemalloc.take_snapshot()
                snapshot.dump(str(directory / f"{tag}.snapshot"))
                current, _peak = tracemalloc.get_traced_memory()
                info["traced"] = current
                info["tracemalloc_overhead"] = tracemalloc.get_tracemalloc_memory()
            (directory / f"{tag}.json.tmp").write_text(json.dumps(info))
            (directory / f"{tag}.json.tmp").rename(directory / f"{tag}.json")
            request.unlink()
        time.sleep(0.1)


def serve(config: str, trace_dir: str, frames: int) -> int:
    """Run lb in this process (as `lb -db -q -f config`), with tracemalloc on when
    `frames` > 0."""
    if frames > 0:
        tracemalloc.start(frames)
    thread = threading.Thread(
        target=_answer_requests, args=(Path(trace_dir), frames > 0), daemon=True
    )
    thread.start()
    # Only the `--serve` process runs lb, and imports it once tracemalloc is on; from
    # --lb-root (PYTHONPATH) when given, ahead of this checkout.
    root = os.environ.get("PYTHONPATH")
    if root:
        sys.path.insert(0, root)
    from lb.cli import main as lb_main  # noqa: PLC0415

    return lb_main(["-db", "-q", "-f", config])


# -- the coordinator ----------------------------------------------------------------------------


def request_snapshot(directory: Path, tag: str, process: Started) -> dict[str, Any]:
    (directory / f"{tag}.request").write_text("")
    answer = directory / f"{tag}.json"
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT
    while not answer.exists():
        if process.popen.poll() is not None:
            raise RuntimeError(f"lb exited:\n{process.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no tracemalloc snapshot {tag} from lb")
        time.sleep(0.1)
    info: dict[str, Any] = json.loads(answer.read_text())
    info["snapshot"] = str(directory / f"{tag}.snapshot")
    return info


def measure_one(
    name: str,
    traced: bool,
    args: argparse.Namespace,
    work: Path,
    pki: Any,
    backend_ports: list[int],
) -> dict[str, Any]:
    port = free_port()
    tag = f"{name}{'-traced' if traced else ''}"
    config = work / f"{tag}.cfg"
    config.write_text(config_text({"fe_ec": port}, {"fe_ec": pki}, backend_ports, args))
    trace_dir = work / f"trace-{tag}"
    trace_dir.mkdir()
    served = name == "lb"
    if served:
        command = [
            sys.executable,
            __file__,
            "--serve",
            str(config),
            "--trace-dir",
            str(trace_dir),
            "--frames",
            str(args.frames if traced else 0),
        ]
    else:
        command = balancer_command(name, config, {"fe_ec": pki}, {"fe_ec": port})
    process = start(tag, command, work, None)
    try:
        wait_listening(port, process)
        time.sleep(0.5)
        before: dict[str, Any] = {"rss": rss_kib(process.pid)}
        if served:
            before.update(request_snapshot(trace_dir, "before", process))
        after: dict[str, Any] = {}

        def hold() -> None:
            time.sleep(1.0)
            after["rss"] = rss_kib(process.pid)
            if served:
                after.update(request_snapshot(trace_dir, "after", process))

        job = Job(
            "idle",
            "127.0.0.1",
            port,
            pki.client,
            workers=2,
            threads=16,
            duration=max(120.0, args.sessions / 100),
            count=args.sessions // 2,
            sources=("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"),
        )
        results = run_job(job, lambda: None, lambda: None, hold)
        time.sleep(CLOSE_SETTLE)  # the balancer sees every close and frees what it held
        closed = rss_kib(process.pid)
        held = sum(r["ops"] for r in results)
        row: dict[str, Any] = {
            "balancer": name,
            "traced": traced,
            "held": held,
            "errors": sum(r["errors"] for r in results),
            "rss_kib": (after["rss"] - before["rss"]) / held if held else None,
            "closed_kib": (closed - before["rss"]) / held if held else None,
        }
        if served and held:
            row["malloc_kib"] = (after["malloc_in_use"] - before["malloc_in_use"]) / held / 1024
            row["heap_free_kib"] = (after["malloc_free"] - before["malloc_free"]) / held / 1024
        if traced and held:
            row["python_kib"] = (after["traced"] - before["traced"]) / held / 1024
            row["top"] = top_sites(before["snapshot"], after["snapshot"], held, args)
        return row
    finally:
        stop(process)


def top_sites(before: str, after: str, held: int, args: argparse.Namespace) -> list[str]:
    """The largest growths of the Python heap, bytes per session, by allocation site."""
    old = tracemalloc.Snapshot.load(before)
    new = tracemalloc.Snapshot.load(after)
    key = "traceback" if args.frames > 1 else "lineno"
    lines = []
    for stat in new.compare_to(old, key)[: args.top]:
        if stat.size_diff <= 0:
            continue
        where = " <- ".join(
            f"{Path(frame.filename).name}:{frame.lineno}" for frame in stat.traceback
        )
        lines.append(
            f"{stat.size_diff / held:8.1f} B/session {stat.count_diff / held:6.2f} blocks  {where}"
        )
    return lines


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    args.maxconn = connections_allowed(raise_limits())
    if args.lb_root is not None:
        # The balancer processes (and --serve) import lb from there, ahead of this checkout.
        os.environ["PYTHONPATH"] = str(args.lb_root.resolve())
    work = Path(tempfile.mkdtemp(prefix="lb-idle-", dir=args.workdir))
    started: list[Started] = []
    rows: list[dict[str, Any]] = []
    try:
        pki = make_pki(work / "ec", "ec")
        backend_ports = [free_port() for _ in range(BACKEND_PORTS)]
        backend = start(
            "backend",
            [
                sys.executable,
                str(ROOT / "bench" / "backend.py"),
                "--ports",
                ",".join(map(str, backend_ports)),
            ],
            work,
            None,
        )
        started.append(backend)
        wait_listening(backend_ports[-1], backend)
        for name in args.balancers:
            rows.append(measure_one(name, False, args, work, pki, backend_ports))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if name == "lb" and args.trace:
                rows.append(measure_one(name, True, args, work, pki, backend_ports))
                print(
                    json.dumps({k: v for k, v in rows[-1].items() if k != "top"}),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for process in reversed(started):
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="lb idle-session memory, split by owner")
    parser.add_argument("--sessions", type=int, default=4000)
    parser.add_argument("--balancers", default="lb", help="lb[,haproxy]")
    parser.add_argument("--no-trace", dest="trace", action="store_false")
    parser.add_argument("--frames", type=int, default=1, help="traceback depth of each site")
    parser.add_argument("--top", type=int, default=15, help="allocation sites shown")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--lb-root", type=Path, help="run the lb package of this checkout")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--trace-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.balancers = [b for b in args.balancers.split(",") if b]
    # config_text's settings, as bench/run.py uses them (maxconn: what descriptors allow)
    args.nbthread, args.proxy = 1, "send-proxy-v2"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args.serve, args.trace_dir, args.frames)
    rows = run(args)
    for row in rows:
        for line in row.pop("top", []):
            print(line, file=sys.stderr)
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
