"""The code's layout is its design (docs/architecture.md): these are the rules, checked."""

import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from surgery.commands import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "surgery"
SHELL = {"__init__", "__main__", "cli", "api", "commands", "console", "errors", "units", "seeds", "process_memory"}
MAX_LINES = 400  # one job per module
MAX_ENTRY_LINES = 160  # an entry module: its options, its click command and `run`


def modules():
    return sorted(path for path in PACKAGE.rglob("*.py"))


def test_the_import_contracts_hold():
    """pyproject.toml's import-linter contracts: imports go down the layers, no package imports a command's entry
    module, nothing imports in a cycle."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_top_level_holds_the_shell_and_one_entry_module_per_command():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top == SHELL | {command.module for command in COMMANDS.values()}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_command_is_its_entry_module_options_command_and_run(name):
    command = COMMANDS[name]
    module = importlib.import_module(f"surgery.{command.module}")
    assert module.command.name == name
    assert dataclasses.is_dataclass(getattr(module, command.options))
    assert callable(module.run)
    assert len((PACKAGE / f"{command.module}.py").read_text().splitlines()) <= MAX_ENTRY_LINES


def test_no_module_is_longer_than_one_job():
    long = {str(path.relative_to(PACKAGE)): count for path in modules()
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_imports_are_at_the_top_except_lazy_ones_that_say_why():
    """A function-level import is allowed where it keeps a path free of a heavy import (torch on `surgery --help`,
    a plain copy, a dry run) and carries a `# lazy: ...` comment saying so."""
    found = []
    for path in modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and "# lazy: " not in lines[inner.lineno - 1]:
                        found.append(f"{path.relative_to(PACKAGE)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module, heavy", [("surgery.partition.sharing_inner", "sklearn"),
                                           ("surgery.execution.routers.registry", "sklearn"),
                                           ("surgery.execution.layer_pass", "transformers")])
def test_heavy_libraries_load_only_where_used(module, heavy):
    """What a module needs only on some paths (scikit-learn to cluster, transformers to build a model) is not
    imported with it: a split that clusters nothing never pays for scikit-learn."""
    code = f"import sys, {module}; assert {heavy!r} not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_package_says_what_it_holds():
    for path in PACKAGE.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), path
