#!/usr/bin/env python3
"""What the container image is built from, made on this machine so the build needs no network.

``python3 packaging/image.py base``
    A base image made from Debian's own packages: ``debootstrap --variant=minbase`` of the
    suite with python3 and python3-venv, from the mirror this machine's apt already uses (read
    from its sources at run time; no host name is written anywhere in the repository), the
    suite's security and point updates applied, then ``docker import``. The Dockerfile takes
    it as ``--build-arg BASE_IMAGE=<tag>`` where no registry serves ``python:3.11-slim``.
    The tag carries a key of what went into it, so a second run finds it and does nothing.

``python3 packaging/image.py wheels``
    Every Python package of ``requirements/image.lock`` as a wheel for the image's platform
    (CPython 3.11, glibc 2.36 as in Debian bookworm), hashes checked, in ``build/wheels``
    (the Dockerfile installs them with ``--no-index``). They are cached per hash of the lock
    file in ``~/.cache/iot-edge-lb/wheels/``, so a rerun copies instead of downloading.

Only the standard library is used: this runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_LOCK = ROOT / "requirements" / "image.lock"
WHEELS_DIR = ROOT / "build" / "wheels"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iot-edge-lb"

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
# Bump to remake every cached base image (say, after changing what goes into it).
BASE_RECIPE = 1
BASE_REPOSITORY = "iot-edge-lb/base"
# Debian bookworm: Python 3.11 and glibc 2.36; wheels must run on both.
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 36
# What the image does not need at run time (documentation, translations, apt's caches).
SLIM_PATHS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
)
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
COMMAND_TIMEOUT = 900.0


class ImageError(Exception):
    """A step could not run; the message says which and why."""


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def run(command: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT,
            **kwargs,  # type: ignore[call-overload]
        )
    except FileNotFoundError:
        raise ImageError(f"{command[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{' '.join(command)}: no result after {COMMAND_TIMEOUT:.0f}s") from None
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ImageError(f"{' '.join(command)} failed ({result.returncode}):\n{tail}")
    return result


# -- the mirror apt uses -------------------------------------------------------------------------


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0].isspace() and key is not None:
            stanza[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def apt_sources() -> list[tuple[str, str, tuple[str, ...]]]:
    """(URI, suite, components) of every enabled ``deb`` source, in apt's order."""
    found: list[tuple[str, str, tuple[str, ...]]] = []
    files = [APT_SOURCES] if APT_SOURCES.is_file() else []
    if APT_SOURCES_DIR.is_dir():
        files += sorted(APT_SOURCES_DIR.iterdir())
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".list":
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], words[2], tuple(words[3:])))
        elif path.suffix == ".sources":
            for stanza in _deb822_stanzas(text):
                if "deb" not in stanza.get("types", "").split():
                    continue
                if stanza.get("enabled", "yes").lower() == "no":
                    continue
                components = tuple(stanza.get("components", "").split())
                for uri in stanza.get("uris", "").split():
                    for suite in stanza.get("suites", "").split():
                        found.append((uri, suite, components))
    return found


def debian_mirror(suite: str) -> tuple[str, list[str]]:
    """The mirror apt uses for ``suite`` and the sources.list lines of the image."""
    sources = apt_sources()
    mirrors = [uri for uri, name, components in sources if name == suite and "main" in components]
    if not mirrors:
        raise ImageError(
            f"no apt source for Debian {suite} main in {APT_SOURCES} or {APT_SOURCES_DIR}: "
            "debootstrap needs the mirror this machine's apt uses"
        )
    lines = [
        f"deb {uri} {name} main"
        for uri, name, components in sources
        if name in {suite, f"{suite}-updates", f"{suite}-security"} and "main" in components
    ]
    return mirrors[0], lines


# -- the base image ------------------------------------------------------------------------------


def base_tag(suite: str = SUITE) -> str:
    key = hashlib.sha256(f"{suite} {' '.join(BASE_PACKAGES)} {BASE_RECIPE}".encode()).hexdigest()
    return f"{BASE_REPOSITORY}:{suite}-python3-{key[:12]}"


def image_exists(tag: str) -> bool:
    result = subprocess.run(
        ["docker", "image", "inspect", tag],
        capture_output=True,
        check=False,
        timeout=60,
    )
    return result.returncode == 0


def make_base(suite: str = SUITE, refresh: bool = False) -> str:
    tag = base_tag(suite)
    if not refresh and image_exists(tag):
        say(f"base image {tag}: present, reused")
        return tag
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root")
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is not installed (apt-get install debootstrap)")
    mirror, source_lines = debian_mirror(suite)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="iot-edge-lb-rootfs-") as temporary:
        rootfs = Path(temporary) / "rootfs"
        say(f"debootstrap --variant=minbase {suite} with {', '.join(BASE_PACKAGES)}")
        command = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
        ]
        if KEYRING.is_file():
            command.append(f"--keyring={KEYRING}")
        run([*command, suite, str(rootfs), mirror])
        # The point and security updates, with the sources apt uses here.
        (rootfs / "etc/apt/sources.list").write_text("\n".join(source_lines) + "\n")
        shutil.copyfile("/etc/resolv.conf", rootfs / "etc/resolv.conf")
        environment = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        run(["chroot", str(rootfs), "apt-get", "-q", "update"], env=environment)
        run(
            ["chroot", str(rootfs), "apt-get", "-q", "-y", "--no-install-recommends", "upgrade"],
            env=environment,
        )
        run(["chroot", str(rootfs), "apt-get", "clean"], env=environment)
        (rootfs / "etc/resolv.conf").write_text("")
        for relative in SLIM_PATHS:
            path = rootfs / relative
            if path.is_dir():
                shutil.rmtree(path)
                path.mkdir()
        say(f"docker import as {tag}")
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
            stdout=subprocess.PIPE,
        )
        try:
            run(
                [
                    "docker",
                    "import",
                    "--change",
                    'CMD ["python3"]',
                    "--change",
                    "ENV LANG=C.UTF-8",
                    "--message",
                    f"debootstrap --variant=minbase {suite} + {' '.join(BASE_PACKAGES)}",
                    "-",
                    tag,
                ],
                stdin=tar.stdout,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait(timeout=COMMAND_TIMEOUT)
    say(f"base image {tag} made in {time.monotonic() - started:.0f}s")
    return tag


# -- the wheels ----------------------------------------------------------------------------------


def lock_key(lock: Path = IMAGE_LOCK) -> str:
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16]


def platform_options(machine: str) -> list[str]:
    """pip download's options for wheels that run on Debian bookworm's CPython 3.11."""
    options = ["--only-binary=:all:", "--python-version", PYTHON_VERSION]
    options += ["--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    # pip takes each platform tag literally: list every glibc the image's 2.36 can run.
    for minor in range(GLIBC_MINOR, 4, -1):
        options += ["--platform", f"manylinux_2_{minor}_{machine}"]
    for legacy in ("manylinux2014", "manylinux2010", "manylinux1"):
        options += ["--platform", f"{legacy}_{machine}"]
    return options


def make_wheels(lock: Path = IMAGE_LOCK, target: Path = WHEELS_DIR) -> Path:
    machine = platform.machine()
    cache = CACHE_DIR / "wheels" / f"{lock_key(lock)}-{machine}"
    if not (cache / ".complete").is_file():
        say(f"pip download -r {lock.relative_to(ROOT)} (hashes checked) into {cache}")
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--require-hashes",
                "-r",
                str(lock),
                "--dest",
                str(partial),
                *platform_options(machine),
            ]
        )
        (partial / ".complete").write_text(f"{lock.name} {lock_key(lock)}\n")
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
    else:
        say(f"wheels for {lock.relative_to(ROOT)}: cached in {cache}")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(cache, target, ignore=shutil.ignore_patterns(".complete"))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packaging/image.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("base", help="make (or find) the base image; print its tag")
    base.add_argument("--suite", default=SUITE)
    base.add_argument("--refresh", action="store_true", help="make it anew even if present")
    commands.add_parser("base-tag", help="print the base image's tag, make nothing")
    commands.add_parser("wheels", help="fill build/wheels from requirements/image.lock")
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "base":
            print(make_base(arguments.suite, arguments.refresh))
        elif arguments.command == "base-tag":
            print(base_tag())
        else:
            print(make_wheels())
    except ImageError as error:
        print(f"packaging/image.py {arguments.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
