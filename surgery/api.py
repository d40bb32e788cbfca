"""The Python API: every command as a function, with the command's option names and defaults.

    import surgery

    result = surgery.upcycle("dense", "moe", num_experts=8, top_k=2, verify=True)
    result.out, result.total_bytes, result.verification["passed"]
    info = surgery.inspect("moe")            # an inspect Report (info.family, info.expert_layout ...)
    report = surgery.validate("moe", references=["dense"], text="...")

Each function is made from the command's entry in ``surgery.commands``: it runs the same code as the command
(``<module>.run``) with the terminal output silenced, and raises ``SurgeryError`` on failure (nothing is
printed, nothing exits). Its keywords are the fields of the command's options dataclass (``UpcycleOptions``
...) and, for a writing command, of ``OutputOptions`` (max_shard_size, force, dry_run, allow_nonfinite, verify,
verify_tokens, layout): one source for names and defaults, shown by ``help()`` and ``inspect.signature``. An
unknown keyword is a TypeError, as for any Python function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect

from surgery import console
from surgery.commands import BY_FUNCTION, COMMANDS, Command
from surgery.execution.settings import RunOptions
from surgery.operations.output import OutputOptions

RUN_FIELDS = {field.name for field in dataclasses.fields(RunOptions)}
OUTPUT_FIELDS = [field for field in dataclasses.fields(OutputOptions) if field.name != "as_json"]  # --json: CLI only


@contextlib.contextmanager
def _silenced():
    """No terminal output while an API call runs (notes, tables, progress bars)."""
    level, quiet = console.VERBOSITY["level"], (console.console.quiet, console.stdout.quiet)
    console.VERBOSITY["level"] = -1
    console.console.quiet = console.stdout.quiet = True
    try:
        yield
    finally:
        console.VERBOSITY["level"] = level
        console.console.quiet, console.stdout.quiet = quiet


def _options_class(command: Command):
    return getattr(importlib.import_module(f"surgery.{command.module}"), command.options)


def signature(command: Command) -> inspect.Signature:
    """The API function's signature: the positional parameters, then the options dataclass's other fields, then
    (a writing command) the output options, each with its default."""
    return _signature(command.name)


@functools.cache
def _signature(name: str) -> inspect.Signature:
    command = COMMANDS[name]
    fields = {field.name: field for field in dataclasses.fields(_options_class(command))}
    parameters = []
    for name in command.positional:
        default = _default(fields[name]) if name in fields else inspect.Parameter.empty
        parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    keywords = sorted((field for name, field in fields.items() if name not in command.positional),
                      key=lambda field: field.name in RUN_FIELDS)  # the command's own options first
    if command.writes:
        keywords += [field for field in OUTPUT_FIELDS if field.name not in fields]
    for field in keywords:
        default = command.output_defaults.get(field.name, _default(field))
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=field.type))
    return inspect.Signature(parameters)


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return inspect.Parameter.empty


def call(command: Command, *args, **kwargs):
    """Run `command` as its API function: the arguments bound to ``signature(command)``, split into the
    positional arguments of ``run``, its options dataclass and (a writing command) ``OutputOptions``."""
    module = importlib.import_module(f"surgery.{command.module}")
    try:
        bound = signature(command).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{command.function}() {exc}") from None
    bound.apply_defaults()
    values = dict(bound.arguments)
    options_class = getattr(module, command.options)
    names = {field.name for field in dataclasses.fields(options_class)}
    given = set(kwargs) | set(list(signature(command).parameters)[:len(args)])
    options = options_class(**{name: value for name, value in values.items() if name in names})
    arguments = [values[name] for name in command.positional if name not in names]
    if command.writes:
        output = OutputOptions(**{field.name: values[field.name] for field in OUTPUT_FIELDS if field.name in values})
        arguments += [options, output]
    else:
        arguments.append(options)
    with _silenced():
        return module.run(*arguments, given=given) if _takes_given(module.run) else module.run(*arguments)


def _takes_given(run) -> bool:
    """Whether a command's ``run`` wants to know which options the caller gave (merge: a --config file's
    settings are overridden only by those)."""
    return "given" in inspect.signature(run).parameters


def function(name: str):
    """The API function `name` (``surgery.<name>``)."""
    command = BY_FUNCTION[name]

    def api_function(*args, **kwargs):
        return call(command, *args, **kwargs)

    api_function.__name__ = api_function.__qualname__ = name
    api_function.__signature__ = signature(command)
    api_function.__doc__ = importlib.import_module(f"surgery.{command.module}").run.__doc__
    return api_function


def __getattr__(name: str):
    if name in BY_FUNCTION:
        return function(name)
    raise AttributeError(f"module 'surgery.api' has no attribute {name!r}")


__all__ = sorted(BY_FUNCTION)
