"""The ``broker`` command: ``broker -p 1883`` or ``broker -c FILE`` (a TOML config, see
:mod:`broker.config`). ``-v`` logs at debug level.

``-p PORT`` without a config is mosquitto 2.0's "local only mode": one anonymous listener on
127.0.0.1, said so in the log; remote access needs a config file that names a listener.
SIGTERM and SIGINT stop the node cleanly (5.0 clients get DISCONNECT 0x8B); with ``[cluster]
stop_evacuation`` the node is evacuated first (broker.evacuation), and a second signal cuts
that short. Under systemd
(``Type=notify``, packaging/broker@.service) it says READY=1 once it serves and STOPPING=1
when it stops, with STATUS= lines (lb.sd_notify).

At start the soft file limit is raised to the hard limit, as HAProxy does, and what the
listeners' ``max_connections`` need of it is worked out (broker.accept.plan_file_limit): a
listener without max_connections gets what the limit allows, and configured ones that the
limit cannot hold are said in one WARNING with the numbers and what to change.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import ssl
import sys

import uvloop

from broker import __version__
from broker.accept import plan_file_limit, raise_file_limit
from broker.cluster import ClusterError, startup_problems
from broker.config import BrokerConfig, ConfigError, default_config, load_config
from broker.logs import FORMAT, SecondCachedFormatter, TurnBufferedHandler
from broker.node import BrokerServer
from lb.pem import TLSFileError
from lb.sd_notify import Notifier

__all__ = ["main"]

logger = logging.getLogger(__name__)

#: mosquitto 2.0's words for -p without a config (src/mosquitto.c), with our way out.
LOCAL_ONLY_MODE = (
    "Starting in local only mode. Connections will only be possible from clients running "
    "on this machine (127.0.0.1:%d). Create a configuration file which defines a listener "
    "to allow remote access (broker -c FILE, see broker/config.py)."
)


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="broker", description="MQTT 3.1.1/5.0 broker node")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    source.add_argument(
        "-p",
        "--port",
        type=int,
        metavar="PORT",
        help="listen on 127.0.0.1:PORT with defaults (local only mode, as mosquitto 2.0)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    return parser.parse_args(argv)


async def _run(config: BrokerConfig, notifier: Notifier) -> None:
    server = BrokerServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop_signal() -> None:
        # The first stops (after an evacuation, with [cluster] stop_evacuation); another
        # cuts that evacuation short.
        if stop.is_set():
            server.hurry()
        stop.set()

    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop_signal)
    listeners = ", ".join(f"{listener.host}:{listener.port}" for listener in config.listeners)
    notifier.ready(f"node {config.node_name}: MQTT on {listeners}")
    try:
        await stop.wait()
    finally:
        logging.getLogger(__name__).info("stopping")
        notifier.stopping(f"node {config.node_name}: stopping")
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    # The format below uses none of these, and each costs every record: thread and process
    # names, the pid, and the caller's frame walk (findCaller). Python's logging HOWTO
    # ("Optimization") names these switches; with two INFO lines per client they were 13%
    # of the broker's CPU per connection (bench/README.md, broker section).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no findCaller (HOWTO)
    handler = TurnBufferedHandler(sys.stderr)
    handler.setFormatter(SecondCachedFormatter(FORMAT))
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO, handlers=[handler]
    )
    try:
        if arguments.config:
            config = load_config(arguments.config)
        else:
            port = arguments.port if arguments.port is not None else 1883
            config = default_config(port)
            logger.warning(LOCAL_ONLY_MODE, port)
    except ConfigError as error:
        print(f"broker: configuration error: {error}", file=sys.stderr)
        return 1
    # Seed 002: private keys readable only by their owner; cluster links need mutual TLS.
    problems = startup_problems(config)
    for problem in problems:
        print(f"broker: cannot start: {problem}", file=sys.stderr)
    if problems:
        return 1
    config = _apply_file_limit(config)
    notifier = Notifier.from_environment()
    try:
        uvloop.run(_run(config, notifier))
    except (OSError, ClusterError, TLSFileError, ssl.SSLError) as error:
        print(f"broker: cannot start: {error}", file=sys.stderr)
        notifier.status(f"cannot start: {error}")
        return 1
    except ConfigError as error:
        # Files the config names (policy_file, password_file) are read as the node starts.
        print(f"broker: configuration error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _apply_file_limit(config: BrokerConfig) -> BrokerConfig:
    """Raise the soft file limit, say what max_connections needs of it, and fill in the
    max_connections of listeners that set none."""
    before, soft = raise_file_limit()
    if soft != before:
        logger.info(
            "file limit (RLIMIT_NOFILE) raised from %d to %d (the hard limit)", before, soft
        )
    plan = plan_file_limit([(item.label, item.max_connections) for item in config.listeners], soft)
    for note in plan.notes:
        logger.info("%s", note)
    for problem in plan.problems:
        logger.warning("%s", problem)
    listeners = tuple(
        dataclasses.replace(item, max_connections=plan.max_connections[item.label])
        for item in config.listeners
    )
    return dataclasses.replace(config, listeners=listeners)
