"""The ``broker`` command: ``broker -p 1883`` (anonymous node, as ``mosquitto -p``) or
``broker -c FILE`` (a TOML config, see :mod:`broker.config`). ``-v`` logs at debug level.
SIGTERM and SIGINT stop the node cleanly (5.0 clients get DISCONNECT 0x8B). Under systemd
(``Type=notify``, packaging/broker@.service) it says READY=1 once it serves and STOPPING=1
when it stops, with STATUS= lines (lb.sd_notify)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys

import uvloop

from broker import __version__
from broker.cluster import ClusterError, startup_problems
from broker.config import BrokerConfig, ConfigError, default_config, load_config
from broker.node import BrokerServer
from lb.pem import TLSFileError
from lb.sd_notify import Notifier

__all__ = ["main"]


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="broker", description="MQTT 3.1.1/5.0 broker node")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    source.add_argument(
        "-p", "--port", type=int, metavar="PORT", help="listen on PORT with defaults"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    return parser.parse_args(argv)


async def _run(config: BrokerConfig, notifier: Notifier) -> None:
    server = BrokerServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
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
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if arguments.config:
            config = load_config(arguments.config)
        else:
            config = default_config(arguments.port if arguments.port is not None else 1883)
    except ConfigError as error:
        print(f"broker: configuration error: {error}", file=sys.stderr)
        return 1
    # Seed 002: private keys readable only by their owner; cluster links need mutual TLS.
    problems = startup_problems(config)
    for problem in problems:
        print(f"broker: cannot start: {problem}", file=sys.stderr)
    if problems:
        return 1
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
