"""``./dev demo`` (``python -m demo``): the whole topology on this machine, from nothing.

1. The PKI: ``python -m demo.pki`` reuses configs/certs when it is complete and valid, else
   makes it with ``lb-pki demo``.
2. Three broker nodes (``broker -c configs/broker-N.toml``), clustered over mutual TLS, and
   ``lb -f configs/haproxy.cfg`` in front of them, each in its own process group with its
   output in demo/out/NAME.log. Every wait for readiness is bounded.
3. The simulated devices (``python -m demo.devices``), which report what they sent and heard,
   what each node's admin endpoint says about them, and the two connections lb refused.
4. A summary: the devices each node holds with the address and CN it learned from the PROXY
   header, the messages, and each refusal with the reason from lb's own log line.

Every port is checked before anything starts; a taken one is named with the process that
holds it, and ``--base-port PORT`` (or ``auto``) moves the whole topology to free ports.

Every process it started is stopped at the end (also on Ctrl-C), unless ``--keep``, which
prints how to talk to the cluster by hand and how to stop it (``python -m demo --stop``).
Exit code: 0 when the summary is all good, 1 when something in it is wrong, 2 when the
topology did not start.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from demo import ports, processes, summary, topology
from demo.processes import Child
from demo.topology import Layout

READY_TIMEOUT = 15.0
CLUSTER_TIMEOUT = 15.0
LB_LINE_TIMEOUT = 3.0
DEVICES_TIMEOUT = 120.0  # the simulator bounds each of its own waits by 20 s
POLL_INTERVAL = 0.05
HTTP_TIMEOUT = 1.0
CLUSTER_LINK_UP = "up"  # a member's state on /api/cluster once its link is up

# lb's line for a refused handshake (lb/log.py, after HAProxy's "SSL handshake failure"):
# 127.0.0.1:39052 [26/Nov/2026:00:01:59.582] emqx-tls/1: SSL handshake failure: <reason>
REFUSAL_LINE = re.compile(
    r"^(?P<address>\S+:\d+) \[[^\]]*\] (?P<frontend>[^/\s]+)/\S+: "
    r"SSL handshake failure: (?P<reason>.+)$"
)
# lb's server state lines (HAProxy's "Server backend/name is UP/DOWN ...").
SERVER_STATE_LINE = re.compile(r"Server (?P<backend>[^/\s]+)/(?P<server>\S+) is (?P<state>UP|DOWN)")
LISTENING_LINE = f"frontend {topology.LB_FRONTEND} listening on"


class StartupError(Exception):
    """The topology did not come up; the message says which part and why."""


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def out_dir() -> Path:
    return topology.ROOT / topology.OUT_DIR


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return json.load(response)


def wait_for(
    what: str, ready: Callable[[], bool], children: Sequence[Child], timeout: float
) -> float:
    """Poll ``ready`` until true; fail early when one of ``children`` exits."""
    started = time.monotonic()
    while not ready():
        for child in children:
            if not child.alive():
                raise StartupError(
                    f"{child.name} exited with {child.popen.returncode} while waiting for "
                    f"{what}; {child.log}:\n{child.log_tail()}"
                )
        if time.monotonic() - started > timeout:
            raise StartupError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(POLL_INTERVAL)
    return time.monotonic() - started


def admin_answers(node: topology.Node) -> bool:
    try:
        http_json(f"http://{topology.LOCAL_HOST}:{node.admin_port}/api/stats")
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return True


def cluster_members(node: topology.Node) -> dict[str, str]:
    """The other members ``node`` reports on ``/api/cluster`` and the state of its link to
    each ("up", "connecting", "down: Connection refused", ...); empty when it reports none."""
    try:
        body = http_json(f"http://{topology.LOCAL_HOST}:{node.admin_port}/api/cluster")
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    members = body.get("members", []) if isinstance(body, dict) else []
    states: dict[str, str] = {}
    for member in members:
        if not isinstance(member, dict) or member.get("name") in {None, node.name}:
            continue
        state = str(member.get("state", "?"))
        if member.get("last_error") and state != CLUSTER_LINK_UP:
            state += f": {member['last_error']}"
        states[str(member["name"])] = state
    return states


def cluster_formed(where: Layout) -> bool:
    for node in where.nodes:
        members = cluster_members(node)
        for other in where.nodes:
            if other is not node and members.get(other.name) != CLUSTER_LINK_UP:
                return False
    return True


def cluster_report(where: Layout) -> str:
    return "; ".join(
        f"{node.name} sees "
        + (", ".join(f"{name} {state}" for name, state in cluster_members(node).items()) or "none")
        for node in where.nodes
    )


def read_log(child: Child) -> list[str]:
    try:
        return child.log.read_text(errors="replace").splitlines()
    except OSError:
        return []


def server_states(lb: Child) -> dict[str, str]:
    """The last state lb logged for each server of the backend (empty without checks)."""
    states: dict[str, str] = {}
    for line in read_log(lb):
        match = SERVER_STATE_LINE.search(line)
        if match and match["backend"] == topology.LB_BACKEND:
            states[match["server"]] = match["state"]
    return states


def start_topology(children: list[Child], where: Layout) -> None:
    out = out_dir()
    brokers: list[Child] = []
    for node in where.nodes:
        child = processes.start(node.name, topology.broker_command(node), out)
        children.append(child)
        brokers.append(child)
        say(
            f"{node.name}: {' '.join(child.command)} (pid {child.pid}; mqtt :{node.mqtt_port} "
            f"with PROXY v2, admin :{node.admin_port}, cluster :{node.cluster_port} mTLS)"
        )
    for node in where.nodes:
        wait_for(
            f"{node.name}'s admin endpoint",
            functools.partial(admin_answers, node),
            brokers,
            READY_TIMEOUT,
        )
    try:
        seconds = wait_for(
            "the cluster", functools.partial(cluster_formed, where), brokers, CLUSTER_TIMEOUT
        )
    except StartupError as error:
        raise StartupError(f"{error} ({cluster_report(where)})") from None
    say(f"cluster formed in {seconds:.1f}s: every node has a mutual TLS link to the others")
    lb = processes.start("lb", topology.lb_command(where.lb_config), out)
    children.append(lb)
    say(
        f"lb: {' '.join(lb.command)} (pid {lb.pid}; "
        f"devices connect to {topology.LOCAL_HOST}:{where.lb_port}, "
        f"/metrics on {topology.LOCAL_HOST}:{where.prometheus_port})"
    )
    wait_for(
        f"lb listening on {topology.LOCAL_HOST}:{where.lb_port}",
        lambda: any(LISTENING_LINE in line for line in read_log(lb)),
        [lb, *brokers],
        READY_TIMEOUT,
    )
    names = [node.server for node in where.nodes]
    wait_for(
        "lb's health checks (no server DOWN)",
        lambda: all(server_states(lb).get(name, "UP") == "UP" for name in names),
        [lb, *brokers],
        READY_TIMEOUT,
    )


def lb_refusal_reasons(lb: Child, refusals: Sequence[dict[str, Any]]) -> dict[str, str | None]:
    """For each refused device, the reason of lb's log line about its address."""
    wanted = {r["local_address"]: r["device"] for r in refusals if r["local_address"]}
    reasons: dict[str, str | None] = {r["device"]: None for r in refusals}
    deadline = time.monotonic() + LB_LINE_TIMEOUT
    while True:
        for line in read_log(lb):
            match = REFUSAL_LINE.match(line)
            if match and match["address"] in wanted:
                reasons[wanted[match["address"]]] = match["reason"]
        if all(reasons.values()) or time.monotonic() > deadline:
            return reasons
        time.sleep(POLL_INTERVAL)


def run_devices(
    children: list[Child], devices: int, messages: int, where: Layout
) -> dict[str, Any]:
    command = topology.local_commands(devices, messages, where)["devices"]
    report_path = topology.ROOT / topology.DEVICES_REPORT
    report_path.unlink(missing_ok=True)
    child = processes.start("devices", command, out_dir())
    children.append(child)
    say(f"devices: {' '.join(command)}")
    try:
        child.popen.wait(DEVICES_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise StartupError(f"the devices did not finish in {DEVICES_TIMEOUT:.0f}s") from None
    try:
        report: dict[str, Any] = json.loads(report_path.read_text())
    except (OSError, ValueError) as error:
        raise StartupError(
            f"the devices left no report ({error}); {child.log}:\n{child.log_tail()}"
        ) from None
    return report


def node_notes(where: Layout) -> dict[str, str]:
    return {
        node.name: f"lb server {node.server} -> {topology.LOCAL_HOST}:{node.mqtt_port}"
        for node in where.nodes
    }


def keep_instructions(children: Sequence[Child], where: Layout) -> list[str]:
    certs = topology.CERTS_DIR
    tls = f"--cafile {certs}/{topology.ROOT_CA}.pem"

    def device(name: str) -> str:
        return f"--cert {certs}/{name}.pem --key {certs}/{name}-key.pem -i {name}"

    endpoint = f"-h {topology.LOCAL_HOST} -p {where.lb_port}"
    first, second = topology.device_name(1), topology.device_name(2)
    return [
        f"The cluster keeps running ({', '.join(f'{c.name} pid {c.pid}' for c in children)}).",
        f"From {topology.ROOT}, connect through lb with mosquitto's clients:",
        f"  mosquitto_sub {endpoint} {tls} {device(second)} -t 'fleet/#' -v",
        f"  mosquitto_pub {endpoint} {tls} {device(first)} -t fleet/{first}/telemetry "
        "-m '{\"temperature\": 21.5}'",
        "Refused by lb (see the reason in demo/out/lb.log):",
        f"  mosquitto_pub {endpoint} {tls} {device(topology.REVOKED_DEVICE)} -t t -m x",
        "What each node holds (address and CN from the PROXY header):",
        *(
            f"  curl http://{topology.LOCAL_HOST}:{node.admin_port}/api/clients   # {node.name}"
            for node in where.nodes
        ),
        f"lb's metrics: curl http://{topology.LOCAL_HOST}:{where.prometheus_port}/metrics",
        f"Logs: {topology.OUT_DIR}/*.log",
        "Stop it: ./dev demo --stop   (or: .venv/bin/python -m demo --stop)",
    ]


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev demo",
        description="PKI, three clustered broker nodes, lb in front, simulated devices, summary",
    )
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    parser.add_argument("--stop", action="store_true", help="stop what a --keep run left")
    parser.add_argument(
        "--fast",
        action="store_true",
        help=f"{topology.FAST_DEVICES} devices, {topology.FAST_MESSAGES} messages each",
    )
    parser.add_argument("--devices", type=int, default=None, help="simulated devices")
    parser.add_argument("--messages", type=int, default=None, help="messages per device")
    parser.add_argument(
        "--base-port",
        type=_base_port,
        default=None,
        metavar="PORT|auto",
        help=(
            "move every port into PORT..PORT+39 (lb PORT, /metrics PORT+1, node N: mqtt "
            "PORT+10+N, admin PORT+20+N, cluster PORT+30+N); auto picks a free block. "
            "Default: the seed's ports (8091, 1883-1885, ...)"
        ),
    )
    arguments = parser.parse_args(argv)
    if arguments.devices is None:
        arguments.devices = topology.FAST_DEVICES if arguments.fast else topology.DEFAULT_DEVICES
    if arguments.messages is None:
        arguments.messages = topology.FAST_MESSAGES if arguments.fast else topology.DEFAULT_MESSAGES
    if not 1 <= arguments.devices <= topology.PKI_DEVICES:
        parser.error(f"--devices must be 1..{topology.PKI_DEVICES}")
    if arguments.messages < 1:
        parser.error("--messages must be at least 1")
    return arguments


def _base_port(value: str) -> int:
    if value == "auto":
        return ports.free_base_port()
    try:
        base = int(value)
        topology.layout(base)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return base


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def make_pki(children: list[Child]) -> None:
    command = topology.pki_command()
    child = processes.start("pki", command, out_dir())
    children.append(child)
    code = child.popen.wait()
    if code != 0:
        raise StartupError(f"{' '.join(command)} failed ({code}):\n{child.log_tail()}")
    say(f"{' '.join(command)}: {child.log_tail(1)}")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.stop:
        stopped = processes.stop_saved(out_dir())
        say(f"stopped {', '.join(stopped)}" if stopped else "nothing to stop")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    children: list[Child] = []
    keep = False
    where = topology.layout(arguments.base_port)
    try:
        taken = ports.busy(where.ports())
        if taken:
            hint = ""
            if (out_dir() / processes.PIDS_FILE).exists():
                hint = "A --keep run is still up? ./dev demo --stop ends it. "
            raise StartupError(hint + ports.taken_message(where, taken))
        if where.base_port is not None:
            ports.write_moved_configs(where)
            say(
                f"ports from {where.base_port}: lb {where.lb_port}, /metrics "
                f"{where.prometheus_port}, "
                + ", ".join(
                    f"{node.name} mqtt {node.mqtt_port} admin {node.admin_port} "
                    f"cluster {node.cluster_port}"
                    for node in where.nodes
                )
                + f" (configs in {topology.MOVED_CONFIG_DIR}/)"
            )
        make_pki(children)
        start_topology(children, where)
        say(f"ready in {time.monotonic() - started:.1f}s")
        report = run_devices(children, arguments.devices, arguments.messages, where)
        lb = next(child for child in children if child.name == "lb")
        reasons = lb_refusal_reasons(lb, report["refusals"])
        print()
        for line in summary.render(report, reasons, node_notes(where)):
            print(line)
        print()
        ok = not summary.problems(report, reasons)
        keep = arguments.keep
        if keep:
            path = processes.save([c for c in children if c.alive()], out_dir())
            for line in keep_instructions([c for c in children if c.alive()], where):
                print(line)
            say(f"pids in {path.relative_to(topology.ROOT)}")
        say(f"done in {time.monotonic() - started:.1f}s")
        return 0 if ok else 1
    except StartupError as error:
        say(f"FAILED: {error}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        if not keep and children:
            stopped, killed = processes.stop(children)
            note = f" (killed: {', '.join(killed)})" if killed else ""
            say(f"stopped {', '.join(stopped) or 'nothing'}{note}")


if __name__ == "__main__":
    sys.exit(main())
