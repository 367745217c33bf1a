"""Shunter's build backend: setuptools', plus an opt-in compiled build.

``SHUNTER_COMPILE=1 pip install .`` compiles the modules every proxied request runs through
(listed in ``setup.py``) to C extensions with mypyc, from the same sources and types; the
README's "The compiled build" says what that saves. Without the variable the build is pure
Python, as before, and needs no C compiler.

Only building a wheel compiles; every other hook runs as the pure build:

- requirements: setuptools learns its own by running setup.py, which would import mypyc
  before it is installed. For a compiled wheel, the pinned compiler and Shunter's own
  dependencies (mypyc compiles against their types) are added to them;
- metadata and the sdist: they do not depend on the compiled modules, and pip asks for the
  metadata before the wheel (compiling there too would run mypyc twice an install);
- an editable install refuses: its compiled modules would sit in ``src/`` beside the
  sources and be imported in their place, so an edit would silently not run.

A compiled wheel starts from an empty ``build/``: setuptools packs what its build directory
holds, so a module taken off the list would otherwise still ship its old extension.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from setuptools import build_meta

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
BUILD_DIR = Path("build")  # setuptools' and mypyc's, under the project's root

ConfigSettings = dict[str, Any] | None


def compiling() -> bool:
    """Whether this build compiles: ``SHUNTER_COMPILE`` set to 1 (setup.py reads it too)."""
    return os.environ.get("SHUNTER_COMPILE", "") == "1"


# --- wheels: the one hook that compiles, and its requirements -------------------------------


def get_requires_for_build_wheel(config_settings: ConfigSettings = None) -> list[str]:
    extra = _compile_requires()
    with _pure():
        own = build_meta.get_requires_for_build_wheel(config_settings)
    return [*own, *extra]


def build_wheel(
    wheel_directory: str,
    config_settings: ConfigSettings = None,
    metadata_directory: str | None = None,
) -> str:
    if compiling():
        shutil.rmtree(BUILD_DIR, ignore_errors=True)
    return str(build_meta.build_wheel(wheel_directory, config_settings, metadata_directory))


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: ConfigSettings = None
) -> str:
    with _pure():
        return str(build_meta.prepare_metadata_for_build_wheel(metadata_directory, config_settings))


def _compile_requires() -> list[str]:
    if not compiling():
        return []
    project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [MYPY, *project["dependencies"]]


# --- the sdist: always the pure build's -------------------------------------------------------


def get_requires_for_build_sdist(config_settings: ConfigSettings = None) -> list[str]:
    with _pure():
        return list(build_meta.get_requires_for_build_sdist(config_settings))


def build_sdist(sdist_directory: str, config_settings: ConfigSettings = None) -> str:
    with _pure():
        return str(build_meta.build_sdist(sdist_directory, config_settings))


# --- editable installs: pure Python only -------------------------------------------------------


def get_requires_for_build_editable(config_settings: ConfigSettings = None) -> list[str]:
    _refuse_compiled_editable()
    return list(build_meta.get_requires_for_build_editable(config_settings))


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: ConfigSettings = None
) -> str:
    _refuse_compiled_editable()
    return str(build_meta.prepare_metadata_for_build_editable(metadata_directory, config_settings))


def build_editable(
    wheel_directory: str,
    config_settings: ConfigSettings = None,
    metadata_directory: str | None = None,
) -> str:
    _refuse_compiled_editable()
    return str(build_meta.build_editable(wheel_directory, config_settings, metadata_directory))


def _refuse_compiled_editable() -> None:
    if compiling():
        raise SystemExit(
            "SHUNTER_COMPILE=1 builds a wheel (pip install .), not an editable install: "
            "compiled modules in src/ would be imported instead of the sources beside them"
        )


@contextmanager
def _pure() -> Iterator[None]:
    """While inside: the build is the pure-Python one (``SHUNTER_COMPILE`` unset)."""
    was = os.environ.pop("SHUNTER_COMPILE", None)
    try:
        yield
    finally:
        if was is not None:
            os.environ["SHUNTER_COMPILE"] = was
