"""The layers point one way: each package imports only the packages below it.

cli → gateway/run → api → routing → policies → fleet → backends → wire → aio, with
protocols, tokenizer and parsers as leaves, observability beside the router and discovery
(Kubernetes) beside the API, driving the fleet. The
fleet knows nothing of the config, the policies, the router or the API; the backends nothing
of the fleet; the wire nothing of inference. Every import counts: at module level, inside
functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import shunter

ROOT = Path(shunter.__file__).parent

# What each package may import from the project, besides itself.
ALLOWED: dict[str, set[str]] = {
    "aio": set(),
    "protocols": set(),
    "tokenizer": set(),
    "parsers": {"tokenizer"},
    "wire": {"aio"},
    "backends": {"aio", "wire", "protocols", "tokenizer", "parsers"},
    "fleet": {"aio", "backends", "wire", "protocols", "parsers"},
    "observability": {"fleet", "backends", "protocols"},
    "discovery": {"fleet"},
    "policies": {"aio", "fleet"},
    "routing": {"aio", "wire", "protocols", "backends", "fleet", "policies", "observability"},
    "api": {"aio", "wire", "protocols", "backends", "fleet", "routing", "observability"},
    "sim": {"wire", "protocols", "tokenizer"},
    # KV-cache events: a leaf the composition root wires; policies get a read-only scorer.
    "kv_events": {"aio", "tokenizer"},
    # --workers N: the supervisor, the children's command lines, the child's side.
    "supervisor": set(),
    # Replicas: the composition root wires it; it feeds the fleet and the policies' trees.
    "peers": {"aio", "fleet", "policies"},
}
# The entry points, at the top, may import anything.
ENTRY = {"cli"}
# Top-level modules: the composition root and the entry points may import anything
# (``compiled``, which build is installed, imports nothing of the project's: it looks up).
TOP = {
    "gateway",
    "run",
    "supervise",
    "config",
    "demo",
    "llamacpp",
    "compiled",
    "__main__",
    "__init__",
}


def _imports(path: Path) -> set[str]:
    """The first component under ``shunter.`` of every module ``path`` imports."""
    return _imports_in(path.read_text(), path.relative_to(ROOT).with_suffix("").parts)


def _imports_in(source: str, inner: tuple[str, ...]) -> set[str]:
    """What ``_imports`` finds in ``source``, a module at ``shunter/<inner>.py``, however
    each import is spelled: ``import shunter.x``, ``from shunter.x import y``, ``from
    shunter import x``, and relative (``from .. import x``, ``from ..x import y``)."""
    package = ["shunter", *inner[:-1]]  # what a relative import starts from
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # ``from pkg import x`` may import the module pkg.x: count both spellings.
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        for name in names:
            parts = name.split(".")
            if parts[0] == "shunter" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_spelling_of_an_import_is_seen() -> None:
    cases = {
        "import shunter.api.app": {"api"},
        "from shunter.fleet import registry": {"fleet"},
        "from shunter import routing": {"routing"},
        "from .. import policies": {"policies"},
        "from ..gateway import Gateway": {"gateway"},
        "from . import client": {"wire"},
        "from .base import UpstreamError": {"wire"},
    }
    for source, expected in cases.items():
        assert _imports_in(source, ("wire", "probe")) == expected, source


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_has_a_rule() -> None:
    packages = {
        p.relative_to(ROOT).parts[0] for p in _modules() if len(p.relative_to(ROOT).parts) > 1
    }
    ruled = set(ALLOWED) | ENTRY
    assert packages <= ruled, f"packages without a layering rule: {packages - ruled}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    parts = path.relative_to(ROOT).parts
    if len(parts) == 1:
        assert path.stem in TOP, f"{path.name}: a new top-level module needs a place here"
        return
    package = parts[0]
    if package in ENTRY:
        return
    upward = _imports(path) - ALLOWED[package] - {package}
    assert not upward, f"{'/'.join(parts)} imports {sorted(upward)}, above {package}"


def test_the_fleet_imports_neither_config_nor_policies() -> None:
    """The rule the redesign was made for, spelled out."""
    for path in (ROOT / "fleet").rglob("*.py"):
        assert not {"config", "policies", "routing", "api"} & _imports(path), path.name
