"""Which build is installed: the compiled one (``SHUNTER_COMPILE=1 pip install .``, whose hot
modules are C extensions made by mypyc; see ``setup.py``) or the pure-Python one.

Said in ``shunter --version`` and the "gateway listening" log line, so that a benchmark or
an operator can tell which they measure: they differ in CPU per request (README, "The
compiled build").
"""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from importlib.util import find_spec


def installed_build() -> str:
    """Whether the HTTP server module is a C extension ("compiled": the compiled build
    compiles all its modules or none) or not ("interpreted"). Looked up, not imported: the
    CLI asks before it knows whether the server will run."""
    spec = find_spec("shunter.wire.server")
    origin = spec.origin if spec is not None else None
    return "compiled" if origin and origin.endswith(tuple(EXTENSION_SUFFIXES)) else "interpreted"
