"""The build: pure Python by default, compiled with ``SHUNTER_COMPILE=1``
(build_backend/shunter_build.py and setup.py), and which of the two is installed
(``shunter.compiled``).

The backend's hooks run in process, as pip runs them, on a copy of the project's build
files in a temporary directory (setuptools writes its egg-info beside the sources), with
mypyc made unimportable: as in a fresh build environment, where only a compiled wheel's
own build installs it.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import sys
import tarfile
import tomllib
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from shunter import compiled
from shunter.compiled import installed_build

ROOT = Path(__file__).resolve().parents[2]
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in")


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The build backend, run from a copy of the project as pip runs it: from the root,
    off ``backend-path``, the variable unset and mypyc not importable."""
    for name in BUILD_FILES:
        shutil.copy(ROOT / name, tmp_path / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for tree in ("build_backend", "src"):
        shutil.copytree(ROOT / tree, tmp_path / tree, ignore=skip)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "build_backend"))
    monkeypatch.delitem(sys.modules, "shunter_build", raising=False)
    monkeypatch.setitem(sys.modules, "mypyc", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "mypyc.build", None)
    monkeypatch.delenv("SHUNTER_COMPILE", raising=False)
    import shunter_build

    return shunter_build


@pytest.fixture
def compiling(backend: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """SHUNTER_COMPILE=1, set after ``backend`` has cleared it."""
    monkeypatch.setenv("SHUNTER_COMPILE", "1")


def test_the_pure_build_needs_no_compiler(backend: ModuleType) -> None:
    requires = backend.get_requires_for_build_wheel()
    assert not [name for name in requires if name.startswith("mypy")]


@pytest.mark.usefixtures("compiling")
def test_a_compiled_wheel_gets_its_pinned_compiler_and_shunters_dependencies(
    backend: ModuleType,
) -> None:
    requires = backend.get_requires_for_build_wheel()  # setup.py ran, mypyc not imported
    assert backend.MYPY in requires
    assert backend.MYPY.startswith("mypy==")  # one compiler, the one CI tests
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(dependencies) <= set(requires)  # mypyc compiles against their types
    assert os.environ["SHUNTER_COMPILE"] == "1"  # back as it was


@pytest.mark.usefixtures("compiling")
def test_metadata_and_the_sdist_are_the_pure_builds_and_the_sdist_carries_the_backend(
    backend: ModuleType, tmp_path: Path
) -> None:
    """pip asks for the metadata before the wheel: compiling there would run mypyc twice.
    A wheel is built from the sdist, so it must hold the backend and setup.py."""
    (tmp_path / "meta").mkdir()
    metadata = backend.prepare_metadata_for_build_wheel(str(tmp_path / "meta"))
    assert "Name: shunter" in (tmp_path / "meta" / metadata / "METADATA").read_text()
    assert not [name for name in backend.get_requires_for_build_sdist() if "mypy" in name]
    sdist = backend.build_sdist(str(tmp_path / "dist"))
    with tarfile.open(tmp_path / "dist" / sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"build_backend/shunter_build.py", "setup.py", "pyproject.toml"} <= names
    assert "src/shunter/wire/server.py" in names
    assert os.environ["SHUNTER_COMPILE"] == "1"


@pytest.mark.usefixtures("compiling")
def test_a_compiled_editable_install_is_refused_and_says_why(
    backend: ModuleType, tmp_path: Path
) -> None:
    where = str(tmp_path / "out")
    for hook in (
        backend.get_requires_for_build_editable,
        lambda: backend.prepare_metadata_for_build_editable(where),
        lambda: backend.build_editable(where),
    ):
        with pytest.raises(SystemExit, match="not an editable install") as refused:
            hook()
        assert "would be imported instead of the sources" in str(refused.value)


def test_a_compiled_wheel_starts_from_an_empty_build_directory(
    backend: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module taken off the compiled list must not ship its old extension from build/.
    (setuptools' own build_wheel is replaced: compiling for real takes a minute, and
    .ci/run builds and tests the real wheel.)"""
    stale = backend.BUILD_DIR / "lib.linux-x86_64-cpython-311" / "shunter" / "gone.so"
    seen: list[bool] = []

    def setuptools_build_wheel(directory: str, settings: object, metadata: object) -> str:
        seen.append(stale.exists())
        return "shunter.whl"

    monkeypatch.setattr(backend.build_meta, "build_wheel", setuptools_build_wheel)
    for compile_it in (False, True):
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.touch()
        if compile_it:
            monkeypatch.setenv("SHUNTER_COMPILE", "1")
        assert backend.build_wheel("dist") == "shunter.whl"
    assert seen == [True, False]  # the pure build leaves build/ alone


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("/site-packages/shunter/wire/server.py", "interpreted"),
        (
            f"/site-packages/shunter/wire/server{importlib.machinery.EXTENSION_SUFFIXES[0]}",
            "compiled",
        ),
        (None, "interpreted"),
    ],
)
def test_the_build_is_told_by_the_servers_module_file(
    origin: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SimpleNamespace(origin=origin)
    monkeypatch.setattr(compiled, "find_spec", lambda name: spec if origin else None)
    assert installed_build() == expected


def test_the_installed_build_is_the_one_asked_for() -> None:
    """CI's compiled tier sets SHUNTER_EXPECT_BUILD=compiled, so that a wheel that came out
    pure Python fails the run instead of testing the interpreted code twice."""
    expected = os.environ.get("SHUNTER_EXPECT_BUILD", "")
    if not expected:
        pytest.skip("SHUNTER_EXPECT_BUILD is set by .ci/run's compiled tier")
    assert installed_build() == expected
