"""surgery: checkpoint surgery that turns dense LLM checkpoints into Mixture-of-Experts ones.

Importing the package is cheap: torch and transformers are imported only by the modules that
compute or validate, never by the CLI entry point itself.

The Python API (``surgery.api``): ``surgery.upcycle``, ``surgery.split``, ``surgery.merge``,
``surgery.copy``, ``surgery.prune``, ``surgery.extract``, ``surgery.add_experts``, ``surgery.inspect`` and ``surgery.validate``, each with its command's option names
and defaults; ``inspect.signature(surgery.upcycle)`` lists them. Failures raise ``SurgeryError``.
"""

__version__ = "0.1.0"

_OPERATION_MODULES = ("upcycle", "split", "copy", "prune", "extract", "add_experts", "inspect", "validate")  # modules that are also the API call


def __getattr__(name):
    import importlib

    if name in _OPERATION_MODULES:
        return importlib.import_module(f"surgery.{name}")  # callable: surgery.upcycle(src, out, ...)
    if name in ("merge", "SurgeryError", "Result"):
        from surgery import api, errors
        from surgery.operations import result

        return {"merge": api.merge, "SurgeryError": errors.SurgeryError, "Result": result.Result}[name]
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")
