"""Shared fixtures: the test PKI (tests/pki.py) and the markers for real peers."""

from __future__ import annotations

import pytest

from tests.harness import haproxy_available

pytest_plugins = ["tests.pki"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    if haproxy_available():
        return
    skip = pytest.mark.skip(reason="HAProxy is not installed (./dev setup installs it as root)")
    for item in items:
        if "haproxy" in item.keywords:
            item.add_marker(skip)
