"""A Docker engine for the tests that build and run the container image, and the packages it
needs, installed and started when they are missing; skipped (with the reason) where they
cannot be.

An engine that already answers is used as it is and left running. Otherwise, as root, this
installs Debian's docker.io when ``dockerd`` is missing, starts ``dockerd`` in the
background and, when the tests are done, stops that dockerd by its pid (and only it: a
Docker engine someone else started is not ours to stop). Its images stay in Docker's store,
which is what makes a second run fast: the base image and the image layers are reused.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import apt_install

ENGINE_START_TIMEOUT = 60.0
ENGINE_STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.2


@dataclass
class Engine:
    """The engine the tests use; ``started`` is the dockerd these tests started, if any."""

    docker: str
    compose: list[str]
    started: subprocess.Popen[bytes] | None
    log: Path | None


def _answers(docker: str) -> bool:
    try:
        result = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            check=False,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def _compose_program(docker: str) -> list[str] | None:
    program = shutil.which("docker-compose")
    if program is not None:
        return [program]
    result = subprocess.run(
        [docker, "compose", "version"], capture_output=True, check=False, timeout=20
    )
    return [docker, "compose"] if result.returncode == 0 else None


@contextmanager
def engine(log_dir: Path) -> Iterator[Engine]:
    """The engine for the tests, or pytest.skip with the reason there is none."""
    docker = shutil.which("docker")
    if docker is not None and _answers(docker):
        compose = _compose_program(docker)
        if compose is None:
            pytest.skip("no docker-compose (./dev setup installs Debian's as root)")
        yield Engine(docker, compose, None, None)
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker engine answers, and starting one needs root")
    if shutil.which("dockerd") is None:
        problem = apt_install("docker.io", "docker-compose")
        if problem is not None:
            pytest.skip(f"no Docker engine: {problem}")
    docker = shutil.which("docker")
    if docker is None or shutil.which("dockerd") is None:
        pytest.skip("docker.io installed no docker/dockerd")
    compose = _compose_program(docker)
    if compose is None and apt_install("docker-compose") is None:
        compose = _compose_program(docker)
    if compose is None:
        pytest.skip("no docker-compose, and apt-get could not install it")
    log = log_dir / "dockerd.log"
    with log.open("wb") as output:
        daemon = subprocess.Popen(
            ["dockerd"],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ENGINE_START_TIMEOUT
        while not _answers(docker):
            if daemon.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
                pytest.skip(f"dockerd did not start (it may not run on this machine): {tail}")
            time.sleep(POLL_INTERVAL)
        yield Engine(docker, compose, daemon, log)
    finally:
        stop(daemon)


def stop(daemon: subprocess.Popen[bytes]) -> None:
    """SIGTERM the dockerd we started (it stops its containerd), SIGKILL if it hangs."""
    if daemon.poll() is not None:
        return
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(ENGINE_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait(ENGINE_STOP_TIMEOUT)
