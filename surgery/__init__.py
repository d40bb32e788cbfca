"""surgery: checkpoint surgery that turns dense LLM checkpoints into Mixture-of-Experts ones, and MoEs into MoEs.

Importing the package is cheap: torch and transformers are imported only by the code that computes or
validates, never by the command line's entry point or the API's signatures.

The Python API: ``surgery.upcycle``, ``surgery.split``, ``surgery.merge``, ``surgery.copy``, ``surgery.prune``,
``surgery.extract``, ``surgery.add_experts``, ``surgery.inspect``, ``surgery.validate`` and ``surgery.verify``,
each with its command's option names and defaults (``inspect.signature(surgery.upcycle)`` lists them; the
commands are listed once, in ``surgery.commands``). Failures raise ``SurgeryError``.
"""

import importlib
import sys
import types

__version__ = "0.1.0"


class _CommandModule(types.ModuleType):
    """A command's entry module (``surgery/upcycle.py``) is also, called, the API function of the same name:
    importing a submodule binds ``surgery.upcycle`` to the module, so the module itself is what
    ``surgery.upcycle(...)`` calls (``surgery.api.call``)."""

    def __call__(self, *args, **kwargs):
        api, commands = _shell("api"), _shell("commands")
        return api.call(commands.BY_MODULE[self.__name__.rpartition(".")[2]], *args, **kwargs)


class _Package(types.ModuleType):
    """The ``surgery`` package: its API functions are looked up in the command registry when first asked for, and
    a command's entry module becomes callable as it is bound to the package (however it was imported)."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        commands = _shell("commands")
        if name in commands.BY_FUNCTION:
            if commands.BY_FUNCTION[name].module == name:
                return importlib.import_module(f"surgery.{name}")  # bound, made callable, by __setattr__
            return _shell("api").function(name)
        if name in EXPORTS:
            return getattr(importlib.import_module(EXPORTS[name]), name)
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            commands = _shell("commands")
            if name in commands.BY_MODULE and commands.BY_MODULE[name].function == name:
                value.__class__ = _CommandModule
                value.__signature__ = _shell("api").signature(commands.BY_MODULE[name])
        super().__setattr__(name, value)


EXPORTS = {"SurgeryError": "surgery.errors", "Result": "surgery.operations.result"}


def _shell(name: str):
    """A module of the shell (the registry, the API), imported when first needed: importing the package stays
    cheap, and the package imports nothing that imports it back."""
    return importlib.import_module(f"surgery.{name}")


sys.modules[__name__].__class__ = _Package
