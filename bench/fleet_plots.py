"""PNG plots of a bench/fleet.py result: connected devices, memory, handshakes/s over time,
one line per balancer, so a storm can be seen rather than read about.

    .venv/bin/python bench/fleet_plots.py bench/results/fleet-storm-....json

matplotlib comes with the `bench` extra (`pip install -e .[bench]`), not with the runtime.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

COLORS = {"lb": "tab:blue", "haproxy": "tab:orange"}


def _series(phase: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    samples = phase["samples"]
    return [s["t"] for s in samples], [s[key] for s in samples]


#: Rates are averaged over this many samples: a device process that was busy for a while
#: reports a whole burst at once, which is not a burst on the wire.
RATE_WINDOW = 5


def _rates(phase: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    samples = phase["samples"]
    times, rates = [], []
    for a, b in zip(samples, samples[RATE_WINDOW:], strict=False):
        if b["t"] > a["t"]:
            times.append(b["t"])
            rates.append((b[key] - a[key]) / (b["t"] - a["t"]))
    return times, rates


def _events(axes: Any, phase: dict[str, Any], color: str) -> None:
    for event in phase.get("events", []):
        if event["event"] in ("ramp done", "hold", "drain", "progress"):
            continue
        axes.axvline(event["t"], color=color, linestyle=":", linewidth=0.8)


def plot(result: dict[str, Any], stem: Path) -> list[Path]:
    """Write STEM-connected.png, STEM-memory.png, STEM-handshakes.png; return the paths."""
    phases: dict[str, Any] = result["phases"]
    title = (
        f"{result['scenario']}: {result['settings']['devices']:,} devices, "
        f"{result['settings']['nodes']} broker nodes ({result['date']})"
    )
    written = []

    def connected(axes: Any, kind: str, phase: dict[str, Any], color: str | None) -> None:
        axes.plot(*_series(phase, "connected"), label=f"{kind}: connected", color=color)
        _events(axes, phase, color or "grey")

    def memory(axes: Any, kind: str, phase: dict[str, Any], color: str | None) -> None:
        times, rss = _series(phase, "balancer_rss_kib")
        axes.plot(times, [v / 1024 for v in rss], label=f"{kind} (all processes)", color=color)
        brokers = [sum(s["broker_rss_kib"]) / 1024 for s in phase["samples"]]
        axes.plot(times, brokers, label=f"brokers behind {kind} (sum)", color=color, ls="--")

    def handshakes(axes: Any, kind: str, phase: dict[str, Any], color: str | None) -> None:
        label = f"{kind}: TLS handshakes/s ({RATE_WINDOW} s mean)"
        axes.plot(*_rates(phase, "handshakes"), label=label, color=color)
        failed = _rates(phase, "refusals")
        axes.plot(*failed, label=f"{kind}: failed attempts/s", color=color, ls=":")
        _events(axes, phase, color or "grey")

    for name, draw, ylabel in (
        ("connected", connected, "devices connected (MQTT session up)"),
        ("memory", memory, "RSS, MiB"),
        ("handshakes", handshakes, "per second (as the devices saw it)"),
    ):
        figure, axes = plt.subplots(figsize=(10, 4.5))
        for kind, phase in phases.items():
            draw(axes, kind, phase, COLORS.get(kind))
        axes.set_xlabel("seconds since the phase started")
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
        written.append(_save(figure, stem, name))
    return written


def _save(figure: Any, stem: Path, name: str) -> Path:
    path = stem.with_name(f"{stem.name}-{name}.png")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        for written in plot(json.loads(path.read_text()), path.with_suffix("")):
            print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
