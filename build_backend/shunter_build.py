"""Shunter's build backend: setuptools', plus an opt-in compiled build.

``SHUNTER_COMPILE=1 pip install .`` compiles the modules every proxied request runs through
(listed in ``setup.py``) to C extensions with mypyc, from the same sources and types: the
gateway spends 13-17% less CPU per request (bench/README.md, "The compiled build"). Without
the variable the build is pure Python, as before, and needs no C compiler.

Two things differ from plain setuptools, both only when compiling:

- the build environment also gets mypy (mypyc ships in it) and Shunter's own dependencies,
  whose types mypyc compiles against (an import it cannot see becomes an untyped object);
- an editable install refuses: its compiled modules would sit in ``src/`` beside the
  sources and be imported in their place, so an edit would silently not run.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import (  # the hooks this module does not change
    build_sdist,
    build_wheel,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]

# The compiler the compiled build is tested with (.ci/run): mypyc's output, and what it
# refuses, change between mypy releases.
MYPY = "mypy==2.4.1"

ConfigSettings = dict[str, Any] | None


def compiling() -> bool:
    """Whether this build compiles: ``SHUNTER_COMPILE`` set to 1."""
    return os.environ.get("SHUNTER_COMPILE", "") == "1"


def _compile_requires() -> list[str]:
    if not compiling():
        return []
    project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [MYPY, *project["dependencies"]]


def get_requires_for_build_wheel(config_settings: ConfigSettings = None) -> list[str]:
    extra = _compile_requires()
    # setuptools learns its own requirements by running setup.py, which would import mypyc
    # before it is installed: asked as for the pure build, then the compiler's are added.
    with _pure():
        own = build_meta.get_requires_for_build_wheel(config_settings)
    return [*own, *extra]


def get_requires_for_build_editable(config_settings: ConfigSettings = None) -> list[str]:
    _refuse_compiled_editable()
    return list(build_meta.get_requires_for_build_editable(config_settings))


def build_editable(
    wheel_directory: str,
    config_settings: ConfigSettings = None,
    metadata_directory: str | None = None,
) -> str:
    _refuse_compiled_editable()
    return str(build_meta.build_editable(wheel_directory, config_settings, metadata_directory))


@contextmanager
def _pure() -> Iterator[None]:
    """While inside: the build is the pure-Python one."""
    was = os.environ.pop("SHUNTER_COMPILE", None)
    try:
        yield
    finally:
        if was is not None:
            os.environ["SHUNTER_COMPILE"] = was


def _refuse_compiled_editable() -> None:
    if compiling():
        raise SystemExit(
            "SHUNTER_COMPILE=1 builds a wheel (pip install .), not an editable install: "
            "compiled modules in src/ would be imported instead of the sources beside them"
        )
