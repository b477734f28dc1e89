"""Run a fuzz target under atheris (libFuzzer), bounded, and read back what it did.

Each target runs in its own subprocess (``tests.fuzz.atheris_child``) with:

- corpus directories: a writable one (new interesting inputs go there; ``build/fuzz/corpus``
  keeps it between long runs), the seeds (seeds.py, written fresh) and the regressions;
- a dictionary of the format's words (keywords, signatures), so the mutator can splice
  ``proxy-v2-options`` or ``\\r\\n\\r\\n\\x00\\r\\nQUIT\\n`` in one step;
- bounds: ``-runs`` and ``-max_total_time``, a per-input ``-timeout`` (a hang is a finding)
  and ``-rss_limit_mb`` (so is unbounded memory);
- ``-seed`` and ``PYTHONHASHSEED=0``: the same runs do the same thing (the short CI pass is
  deterministic as long as it stops on ``-runs``, not on the clock).

A crash leaves its input in the artifacts directory; ``save_regression`` copies it to
``tests/fuzz/regressions/TARGET/`` where tests/test_fuzz.py replays it forever.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import CodeType, FrameType

from lb.config import keywords
from lb.proxyproto import V2_SIGNATURE
from tests.fuzz.seeds import write_seeds
from tests.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent.parent
REGRESSIONS = Path(__file__).resolve().parent / "regressions"

#: Longest input per target: frames and headers are short, configuration files are not.
MAX_LENGTH = {
    "proxy": 2048,
    "mqtt": 4096,
    "cluster": 4096,
    "control": 4096,
    "haproxy-cfg": 16384,
    "broker-toml": 8192,
    "authz-policy": 8192,
}
#: libFuzzer's per-input limit: a unit slower than this is a hang (a finding).
INPUT_TIMEOUT_SECONDS = 10
RSS_LIMIT_MB = 2048

_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)")
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class RunResult:
    target: str
    seconds: float
    executions: int = 0
    coverage: int = 0  # libFuzzer "cov": edges reached in the target's own modules
    features: int = 0  # libFuzzer "ft"
    corpus: int = 0  # inputs kept as interesting
    seeds: int = 0
    exit_code: int = 0
    artifacts: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def found(self) -> bool:
        return self.exit_code != 0 or bool(self.artifacts)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "found": self.found}


def _escape(word: bytes) -> str:
    return "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in b'"\\' else f"\\x{byte:02x}"
        for byte in word
    )


def dictionary(target: str) -> list[bytes]:
    """The words of the target's format, for libFuzzer's -dict."""
    if target == "proxy":
        return [
            b"PROXY ",
            b"TCP4 ",
            b"TCP6 ",
            b"UNKNOWN",
            b"\r\n",
            b"127.0.0.1 ",
            b"::ffff:",
            b" 65535",
            V2_SIGNATURE,
            V2_SIGNATURE + b"\x21\x11\x00\x0c",
            V2_SIGNATURE + b"\x21\x21\x00\x24",
            V2_SIGNATURE + b"\x20\x00\x00\x00",
            *(bytes((tlv, 0)) for tlv in (1, 2, 3, 4, 5, 0x20, 0x21, 0x22, 0x30, 0xE1)),
            b"\x30\x03\x31\x01\x00",
        ]
    if target == "mqtt":
        return [
            b"\x00\x04MQTT\x04",
            b"\x00\x04MQTT\x05",
            b"\x00\x06MQIsdp\x03",
            b"\xff\xff\xff\x7f",
            b"$share/g/",
            b"/+/#",
            *(bytes((identifier,)) for identifier in (0x01, 0x02, 0x08, 0x0B, 0x11, 0x23, 0x26)),
        ]
    if target == "control":
        return [b'{"t":', b'"server"', b'"cert"', b'"gather"', b"Infinity", b"NaN", b"1e999"]
    if target == "haproxy-cfg":
        words = {*keywords.SECTIONS, *keywords.GLOBAL_KEYWORDS, *keywords.PROXY_KEYWORDS}
        words |= {*keywords.BIND_OPTIONS, *keywords.SERVER_OPTIONS, *keywords.TIMEOUT_NAMES}
        words |= {"${HOME}", "${NOPE-x}", "\\x41", "127.0.0.1:8883", "10s", "option", "ssl"}
        return sorted(word.encode() for word in words)
    if target == "broker-toml":
        source = (ROOT / "broker" / "config.py").read_text()
        keys = set(
            re.findall(
                r"\.(?:string|boolean|integer|duration|table_at|string_list|"
                r'get)\("(\w+)"',
                source,
            )
        )
        keys |= {
            "[listeners.tcp.default]",
            "[listeners.ssl.default.ssl_options]",
            "[cluster]",
            "[authorization.x509_attributes.a]",
            "[node]",
            "[mqtt]",
            "[admin]",
            '"127.0.0.1:1883"',
            '"CN = a, O = b"',
            '"3s"',
            "verify_peer",
        }
        return sorted(key.encode() for key in keys)
    if target == "authz-policy":
        words = [
            "principals", "clientIds", "usernames", "attributes", "brokerResources", "method",
            "Connect", "Publish", "Subscribe", "topics", "stateStoreResources", "keyType",
            "keys", "Pattern", "String", "Binary", "Read", "Write", "ReadWrite",
            "{principal.clientId}", "{principal.username}", "{principal.attributes.",
            "kind: BrokerAuthorization", "spec:", "authorizationPolicies:", "rules:", "&a", "*a",
        ]  # fmt: skip
        return [word.encode() for word in words]
    return []


def _write_dictionary(target: str, path: Path) -> Path | None:
    words = dictionary(target)
    if not words:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f'w{index}="{_escape(word)}"' for index, word in enumerate(words)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_target(
    target: str,
    workdir: Path,
    *,
    corpus: Path,
    seconds: float,
    runs: int = -1,
    seed: int = 1,
) -> RunResult:
    """Fuzz ``target`` for at most ``seconds`` (and ``runs`` inputs, when >= 0)."""
    seeds_directory = workdir / "seeds" / target
    shutil.rmtree(seeds_directory, ignore_errors=True)
    seed_count = write_seeds(target, seeds_directory)
    corpus_directory = corpus / target
    corpus_directory.mkdir(parents=True, exist_ok=True)
    regressions = REGRESSIONS / target
    artifacts = workdir / "artifacts" / target
    artifacts.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-max_total_time={max(1, int(seconds))}",
        f"-runs={runs}",
        f"-seed={seed}",
        f"-timeout={INPUT_TIMEOUT_SECONDS}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={MAX_LENGTH[target]}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        "-close_fd_mask=1",  # the code under test may print; keep libFuzzer's stderr
    ]
    dictionary_path = _write_dictionary(target, workdir / "dicts" / f"{target}.dict")
    if dictionary_path is not None:
        flags.append(f"-dict={dictionary_path}")
    directories = [corpus_directory, seeds_directory]
    if regressions.is_dir():
        directories.append(regressions)
    log_path = workdir / f"{target}.log"
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.fuzz.atheris_child",
                target,
                ",".join(TARGETS[target].modules),
                *flags,
                *map(str, directories),
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            timeout=seconds + 120,  # startup, corpus loading, the final stats
            check=False,
        )
    result = RunResult(target, time.monotonic() - started, seeds=seed_count)
    result.exit_code = process.returncode
    result.log = str(log_path)
    _parse_log(log_path.read_text(errors="replace"), result)
    return result


def _parse_log(text: str, result: RunResult) -> None:
    for line in text.splitlines():
        status = _STATUS.match(line)
        if status:
            result.executions = max(result.executions, int(status.group(1)))
            result.coverage = max(result.coverage, int(status.group(3)))
            result.features = max(result.features, int(status.group(4)))
            result.corpus = int(status.group(5))
        stat = _STAT.match(line)
        if stat and stat.group(1) == "number_of_executed_units":
            result.executions = max(result.executions, int(stat.group(2)))
        artifact = _ARTIFACT.search(line)
        if artifact:
            result.artifacts.append(artifact.group(1))


def save_regression(target: str, artifact: Path) -> Path:
    """Copy a crashing input into tests/fuzz/regressions/TARGET/ under its content hash."""
    data = artifact.read_bytes()
    destination = (
        REGRESSIONS
        / target
        / f"{artifact.name.split('-')[0]}-{hashlib.sha1(data).hexdigest()[:16]}"
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(data)
    return destination


def regression_inputs(target: str) -> list[Path]:
    directory = REGRESSIONS / target
    return sorted(directory.iterdir()) if directory.is_dir() else []


def _function_lines(code: CodeType) -> set[int]:
    """Lines of every function and class body in ``code`` (not the module's own lines,
    which ran at import, before anything was traced)."""
    lines: set[int] = set()
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            lines.update(line for _, _, line in constant.co_lines() if line is not None)
            lines.update(_function_lines(constant))
    return lines


def line_coverage(target: str, inputs: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """Replay ``inputs`` through the target with a line tracer: for each of the target's own
    modules, (lines reached, lines in its functions). A complement to libFuzzer's edge
    count, which covers every lb and broker module the target touches."""
    executable: dict[str, set[int]] = {}
    names: dict[str, str] = {}
    for name in TARGETS[target].modules:
        module = importlib.import_module(name)
        filename = str(module.__file__)
        source = Path(filename).read_text()
        executable[filename] = _function_lines(compile(source, filename, "exec"))
        names[filename] = name
    reached: dict[str, set[int]] = {filename: set() for filename in executable}

    def trace_lines(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        if event == "line":
            reached[frame.f_code.co_filename].add(frame.f_lineno)
        return trace_lines

    def trace_calls(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        if frame.f_code.co_filename in reached:
            reached[frame.f_code.co_filename].add(frame.f_lineno)
            return trace_lines
        return None

    check = TARGETS[target].check
    previous = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        for path in inputs:
            try:
                check(path.read_bytes())
            except Exception:  # a crashing input counts for the lines it reached
                pass
    finally:
        sys.settrace(previous)
    return {
        names[filename]: (len(reached[filename] & lines), len(lines))
        for filename, lines in executable.items()
    }
