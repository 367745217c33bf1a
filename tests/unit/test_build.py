"""The build: pure Python by default, compiled with ``SHUNTER_COMPILE=1``
(build_backend/shunter_build.py and setup.py), and which of the two is installed
(``shunter.compiled``)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from shunter.compiled import build

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The build backend, as pip runs it: from the project's root, off ``backend-path``."""
    monkeypatch.syspath_prepend(str(ROOT / "build_backend"))
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("SHUNTER_COMPILE", raising=False)
    import shunter_build

    return shunter_build


def test_the_pure_build_needs_no_compiler(backend: ModuleType) -> None:
    requires = backend.get_requires_for_build_wheel()
    assert "wheel" in requires or requires == []  # setuptools' own, whatever its version asks
    assert not [name for name in requires if name.startswith("mypy")]


def test_the_compiled_build_gets_its_pinned_compiler_and_shunters_dependencies(
    backend: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHUNTER_COMPILE", "1")
    requires = backend.get_requires_for_build_wheel()
    assert backend.MYPY in requires
    assert backend.MYPY.startswith("mypy==")  # one compiler, the one CI tests
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(dependencies) <= set(requires)  # mypyc compiles against their types
    # setup.py ran as the pure build to learn setuptools' own needs (it would otherwise have
    # imported mypyc before it was installed), and the setting is back as it was.
    assert os.environ["SHUNTER_COMPILE"] == "1"


def test_a_compiled_editable_install_is_refused_and_says_why(
    backend: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHUNTER_COMPILE", "1")
    for hook in (backend.get_requires_for_build_editable, lambda: backend.build_editable("x")):
        with pytest.raises(SystemExit, match="not an editable install") as refused:
            hook()
        assert "would be imported instead of the sources" in str(refused.value)


def test_the_installed_build_names_itself() -> None:
    """``shunter --version`` and the start-up log say which build runs; CI's compiled tier
    sets SHUNTER_EXPECT_BUILD, so that a build that silently fell back to pure Python fails."""
    from shunter.wire import server

    assert build() == ("interpreted" if server.__file__.endswith(".py") else "compiled")
    if expected := os.environ.get("SHUNTER_EXPECT_BUILD"):
        assert build() == expected
