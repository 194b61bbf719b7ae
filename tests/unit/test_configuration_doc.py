"""docs/configuration.md is generated from the CLI: it must equal what the generator prints now.

The generator (docs/gen_configuration.py) reads every command, option, environment variable,
default and help text from the typer app, so this fails as soon as an option is added, renamed
or changed in taskmesh/cli.py without regenerating the reference.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "docs" / "gen_configuration.py"
DOC = ROOT / "docs" / "configuration.md"
REGENERATE = "python docs/gen_configuration.py > docs/configuration.md"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_configuration", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_doc_matches_the_cli() -> None:
    expected = load_generator().render()
    actual = DOC.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                actual.splitlines(keepends=True),
                expected.splitlines(keepends=True),
                "docs/configuration.md (checked in)",
                "docs/configuration.md (generated from taskmesh/cli.py)",
            )
        )
        pytest.fail(
            f"docs/configuration.md is out of date with taskmesh/cli.py; regenerate it from the "
            f"repository root with:\n    {REGENERATE}\n\n{diff}",
            pytrace=False,
        )


def test_every_command_and_variable_is_documented() -> None:
    """A second look from another angle: each command has a section, each variable a row."""
    import typer.main

    from taskmesh.cli import app

    generator = load_generator()
    text = DOC.read_text(encoding="utf-8")
    for name, command in generator._commands(typer.main.get_command(app)):
        assert f"## `taskmesh {name}`" in text
        for param in command.params:
            if param.envvar:
                assert f"`{param.envvar}`" in text, f"{name}: {param.envvar} is not documented"
            for opt in param.opts:
                if opt.startswith("-"):
                    assert f"`{opt}`" in text, f"{name}: {opt} is not documented"


def test_the_script_prints_the_same_text() -> None:
    """What the regenerate command writes is what the test compares against."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}  # output does not depend on the locale
    for name in list(env):
        if name.startswith("TASKMESH_"):
            del env[name]
    out = subprocess.run(
        [sys.executable, str(GENERATOR)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.decode("utf-8") == load_generator().render()
