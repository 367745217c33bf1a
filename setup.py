"""setuptools' entry point, for the compiled build's extension modules alone: everything
else about the package is in pyproject.toml. See build_backend/shunter_build.py."""

from __future__ import annotations

import os
from typing import cast

from setuptools import Extension, setup

# The modules every proxied HTTP request runs through, where its Python time goes (py-spy
# and cProfile, bench/README.md): the HTTP/1.1 server and client, the router, the API
# handlers, the HTTP backend, the access log and the metrics. Compiling the rest buys little
# and would hold more of the code to mypyc's rules (a compiled class refuses interpreted
# subclasses unless it allows them).
COMPILED = [
    "src/shunter/wire/server.py",
    "src/shunter/wire/client.py",
    "src/shunter/routing/router.py",
    "src/shunter/api/app.py",
    "src/shunter/api/inference.py",
    "src/shunter/backends/http/backend.py",
    "src/shunter/backends/http/client.py",
    "src/shunter/observability/access_log.py",
    "src/shunter/observability/metrics.py",
]

# mypyc type-checks what the compiled modules import, and the build has only Shunter's own
# dependencies: the optional extras' libraries (OpenTelemetry, grpcio, tokenizers), which no
# compiled module imports, are read as untyped, and the strict checks about untyped values
# that this makes fail are off for the compile (mypy --strict checks them, all installed).
_MYPY_OPTIONS = [
    "--ignore-missing-imports",
    "--no-warn-unused-ignores",
    "--no-warn-return-any",
    "--allow-subclassing-any",
]


def extension_modules() -> list[Extension]:
    """The compiled modules when ``SHUNTER_COMPILE=1``; none otherwise. (The build backend
    reads the same variable, ``shunter_build.compiling``; this file is run by setuptools,
    which does not put the backend on the path when run by hand.)"""
    if os.environ.get("SHUNTER_COMPILE", "") != "1":
        return []
    from mypyc.build import mypycify

    # Typed as either setuptools' or distutils' Extension: with setuptools present (it is
    # running this), setuptools'.
    return cast("list[Extension]", mypycify([*_MYPY_OPTIONS, *COMPILED], opt_level="3"))


setup(ext_modules=extension_modules())
