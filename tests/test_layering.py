"""The layers of STYLE.md rule 1, checked over the import graph of lb/ and broker/ (read
from the source with `ast`, so nothing is imported and nothing runs):

- the sans-IO modules (codecs, config, balancers, health state) import no asyncio, socket,
  ssl or uvloop, and neither does anything they import (their packages' __init__ too);
- lb never imports broker;
- broker imports from lb only its leaf modules, which import nothing else from lb.

Imports under `if TYPE_CHECKING:` do not run and do not count; imports inside functions do.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lb", "broker")

#: The sans-IO modules, as globs under the repository root.
SANS_IO = (
    "lb/proxyproto.py",
    "lb/control_codec.py",
    "lb/tls_codes.py",
    "lb/tls_records.py",
    "lb/health.py",
    "lb/log_format.py",
    "lb/event_rate.py",
    "lb/mqtt_check.py",
    "lb/tcpcheck.py",
    "lb/balance/*.py",
    "lb/config/*.py",
    "broker/mqtt/*.py",
    "broker/cluster_codec.py",
)
#: The net layer's modules: what the sans-IO modules must not reach.
NETWORK = ("asyncio", "socket", "ssl", "uvloop")
#: What broker may import from lb: modules that need nothing else of lb.
LB_LEAVES = (
    "lb",
    "lb.event_rate",
    "lb.heap",
    "lb.http11",
    "lb.pem",
    "lb.proxy_hmac",
    "lb.proxyproto",
    "lb.ratelimit",
    "lb.sd_notify",
    "lb.timerwheel",
    "lb.tls_codes",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all of them but those under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    walk(other)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            walk(child)

    walk(tree)
    return found


@cache
def imports_of(name: str) -> frozenset[str]:
    """The modules `name` imports when it runs, fully qualified; `from package import x`
    names the submodule package.x when there is one."""
    modules = all_modules()
    path = modules[name]
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = node.module or ""
        found.add(target)
        for alias in node.names:
            if f"{target}.{alias.name}" in modules:
                found.add(f"{target}.{alias.name}")
    return frozenset(found)


def with_parents(name: str) -> set[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts) + 1)}


def closure(name: str) -> set[str]:
    """Every project module that importing `name` runs."""
    modules = all_modules()
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        for module in with_parents(current):
            if module in seen or module not in modules:
                continue
            seen.add(module)
            todo.extend(m for m in imports_of(module) if m.split(".")[0] in PACKAGES)
    return seen


def sans_io_modules() -> list[str]:
    paths = {path for pattern in SANS_IO for path in ROOT.glob(pattern)}
    assert paths, "no sans-IO module found: the globs are stale"
    return sorted(module_name(path) for path in paths)


def network_imports(module: str) -> set[str]:
    return {m for m in imports_of(module) if m.split(".")[0] in NETWORK}


@pytest.mark.parametrize("module", sans_io_modules())
def test_sans_io_modules_reach_no_network_module(module: str) -> None:
    offenders = {
        f"{reached} imports {', '.join(sorted(bad))}"
        for reached in closure(module)
        if (bad := network_imports(reached))
    }
    assert not offenders, f"{module} reaches the net layer: {sorted(offenders)}"


def test_lb_never_imports_broker() -> None:
    offenders = {
        f"{module} imports {target}"
        for module in all_modules()
        if module.split(".")[0] == "lb"
        for target in imports_of(module)
        if target.split(".")[0] == "broker"
    }
    assert not offenders, sorted(offenders)


def test_broker_imports_only_lb_leaf_modules() -> None:
    imported = {
        (module, target)
        for module in all_modules()
        if module.split(".")[0] == "broker"
        for target in imports_of(module)
        if target.split(".")[0] == "lb"
    }
    assert imported, "broker no longer uses lb: update LB_LEAVES"
    offenders = sorted(f"{module} imports {target}" for module, target in imported)
    assert all(target in LB_LEAVES for _, target in imported), offenders
    for leaf in LB_LEAVES:
        reached = {m for m in closure(leaf) if m.split(".")[0] == "lb"}
        assert reached <= set(LB_LEAVES), f"{leaf} is not a leaf: it runs {sorted(reached)}"


def test_the_graph_reader_sees_what_python_sees() -> None:
    """Guards the reader itself: known edges, TYPE_CHECKING skipped, relative imports."""
    assert "lb.tls_io" in imports_of("lb.datapath")
    assert "lb.frontend" not in imports_of("lb.datapath")  # only under TYPE_CHECKING
    assert "broker.mqtt.packets" in imports_of("broker.mqtt.codec")  # from .packets import
    assert "lb.config" in closure("lb.config.model")  # the package's __init__ runs first
