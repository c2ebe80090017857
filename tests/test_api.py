"""The package-level Python API: ``clarify_lit.__version__``, ``clarify --version`` and the lazily exported names."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import clarify_lit
from clarify_lit.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_package_version(capsys):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert clarify_lit.__version__ == metadata.version("clarify_lit") == pyproject
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"clarify_lit {pyproject}"


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert clarify_lit._package_version() == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_every_exported_name_is_the_defining_modules_object():
    assert set(clarify_lit.__all__) == {"__version__", *clarify_lit._EXPORTS}
    for name, module in clarify_lit._EXPORTS.items():
        assert getattr(clarify_lit, name) is getattr(importlib.import_module(module), name), name
    assert set(clarify_lit.__all__) <= set(dir(clarify_lit))
    with pytest.raises(AttributeError, match="has no attribute 'Reffit'"):
        clarify_lit.Reffit  # noqa: B018


def test_importing_the_package_or_the_records_module_does_not_import_torch():
    code = (
        "import sys, clarify_lit, clarify_lit.data.records; "
        "heavy = [m for m in ('torch', 'lightning', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; print(clarify_lit.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == clarify_lit.__version__


def test_readme_example_names_exist():
    """The README's Python API example uses only names the package exports."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    used = {part.split("(")[0].split(".")[0].split(")")[0] for part in code.split("cl.")[1:]}
    assert used and used <= set(clarify_lit.__all__), used - set(clarify_lit.__all__)
