"""The Python API: every command as a function, with the command's option names and defaults.

    import surgery

    result = surgery.upcycle("dense", "moe", num_experts=8, top_k=2, verify=True)
    result.out, result.total_bytes, result.verification["passed"]
    info = surgery.inspect("moe")            # an inspect Report (info.family, info.expert_layout ...)
    report = surgery.validate("moe", references=["dense"], text="...")

Each function runs the same code as its command (``<module>.run``) with the terminal output
silenced; failures raise ``SurgeryError`` (nothing is printed, nothing exits). Keyword arguments are
the fields of the operation's options dataclass (``UpcycleOptions``, ``SplitOptions``) plus
``OutputOptions`` (max_shard_size, force, dry_run, allow_nonfinite, verify, verify_tokens): one
source for names and defaults, shown by ``help()`` and ``inspect.signature``. An unknown keyword is a
TypeError, as for any Python function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect as _inspect


@contextlib.contextmanager
def _silenced():
    """No terminal output while an API call runs (notes, tables, progress bars)."""
    from surgery import console

    level, quiet = console.VERBOSITY["level"], (console.console.quiet, console.stdout.quiet)
    console.VERBOSITY["level"] = -1
    console.console.quiet = console.stdout.quiet = True
    try:
        yield
    finally:
        console.VERBOSITY["level"] = level
        console.console.quiet, console.stdout.quiet = quiet


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _take(options: dict, cls, skip=(), **fixed):
    """Build `cls` from `fixed` and the keywords in `options` that name its other fields (removing them)."""
    names = [name for name in _fields(cls) if name not in skip and name not in fixed]
    return cls(**fixed, **{name: options.pop(name) for name in names if name in options})


def _refuse_rest(options: dict, function: str) -> None:
    if options:
        raise TypeError(f"{function}() got unexpected keyword argument(s): {', '.join(sorted(options))}")


def _output(options: dict):
    from surgery.operations.output import OutputOptions

    return _take(options, OutputOptions, skip=("as_json",))


def _module(name: str):
    return importlib.import_module(f"surgery.{name}")


# ---------------------------------------------------------------- operations
def copy(src, out, *, dtype: str = "keep", layout: str = "keep", top_k: int | None = None,
         norm_topk_prob: bool | None = None, **output):
    """Copy SRC to OUT through the streaming writer (re-shard with max_shard_size, cast with dtype, convert the
    expert layout with layout="per-expert" or "fused", change an MoE's top_k / norm_topk_prob in its config).
    Returns a ``Result``."""
    options = dict(output, layout=layout)
    written = _output(options)
    _refuse_rest(options, "copy")
    with _silenced():
        return _module("copy").run(src, out, dtype, written, top_k=top_k, norm_topk_prob=norm_topk_prob)


def upcycle(src, out, num_experts: int, top_k: int, **options):
    """Dense -> MoE: each FFN becomes `num_experts` experts (exact for any router; see docs/upcycle.md).
    Keywords: ``UpcycleOptions`` fields and ``OutputOptions`` fields. Returns a ``Result``."""
    return _dense_to_moe("upcycle", "UpcycleOptions", src, out, num_experts, top_k, options)


def split(src, out, num_experts: int, top_k: int, **options):
    """Dense -> MoE: each FFN's neurons are partitioned into `num_experts` experts (docs/split.md).
    Keywords: ``SplitOptions`` fields and ``OutputOptions`` fields. Returns a ``Result``."""
    return _dense_to_moe("split", "SplitOptions", src, out, num_experts, top_k, options)


def _dense_to_moe(operation: str, options_class: str, src, out, num_experts: int, top_k: int, options: dict):
    module = _module(operation)
    options = dict(options)
    output = _output(options)
    settings = _take(options, getattr(module, options_class), num_experts=num_experts, top_k=top_k)
    _refuse_rest(options, operation)
    with _silenced():
        return module.run(src, out, settings, output)


def merge(out, experts: dict | None = None, *, config=None, seed=None, include_seed: bool = False,
          weights: dict | None = None, non_ffn: str = "auto", top_k: int = 2, format: str = "auto",
          router_init: str = "auto", router_fit: str | None = None, calibration: dict | None = None,
          calibration_tokens: int = 16384, router_seed: int = 0, dtype: str = "keep", head_fit: bool | None = None,
          device: str = "auto", memory_budget: str | None = None, compute_dtype: str = "auto", **output):
    """Branch-Train-MiX: domain-trained copies of one seed become one MoE (docs/merge.md).

    `experts`: {name: checkpoint directory} in expert order; or `config`: a YAML file (ours or
    mergekit-moe's), whose settings the other keywords then override only where given explicitly is
    not supported here: with `config`, give only output keywords. `calibration`: {name: text file}.
    `weights`: {name: averaging weight} ("seed" names the seed). Returns a ``Result``."""
    from surgery.btx_merge import run
    from surgery.execution.session import RunSettings
    from surgery.merge_config import FITS_DEFAULT, load_config, spec_from_options

    options = dict(output)
    written = _output(options)
    _refuse_rest(options, "merge")
    with _silenced():
        if config is not None:
            if experts:
                from surgery.errors import SurgeryError

                raise SurgeryError(f"config {config} lists the experts; do not also give experts")
            spec = load_config(config)
        else:
            spec = spec_from_options([f"{name}={path}" for name, path in (experts or {}).items()],
                                     None if seed is None else str(seed), include_seed,
                                     [f"{name}={value}" for name, value in (weights or {}).items()], non_ffn, top_k,
                                     format, router_init,
                                     [f"{name}={path}" for name, path in (calibration or {}).items()], dtype,
                                     router_seed, calibration_tokens, router_fit or FITS_DEFAULT, head_fit)
        return run(spec, out, written, RunSettings(device, memory_budget, compute_dtype))


def prune(moe, out, *, layout: str = "keep", **options):
    """MoE -> MoE: keep the `keep` best-scored routed experts of every MoE layer (or drop the share `ratio`),
    scored by `criterion` (reap, frequency, activation, random; docs/prune.md). Keywords: ``PruneOptions``
    fields and ``OutputOptions`` fields. Returns a ``Result`` (``result.plan.details["prune"]``: the scores
    and the kept and dropped experts per layer)."""
    return _moe_to_moe("prune", "PruneOptions", moe, out, dict(options, layout=layout))


def extract(moe, out, **options):
    """MoE -> dense: every MoE layer's FFN becomes one routed expert's (`expert`) or the experts' weights averaged
    (`average` uniform or frequency; docs/extract.md). Keywords: ``ExtractOptions`` fields and ``OutputOptions``
    fields. Returns a ``Result`` (``result.plan.details["extract"]``: each layer's expert weights)."""
    return _moe_to_moe("extract", "ExtractOptions", moe, out, options)


def add_experts(moe, out, *, layout: str = "keep", **options):
    """MoE -> MoE: each dense model of `expert` ({NAME: DENSE} or NAME=DENSE strings) adds its FFN as a new routed
    expert in every MoE layer, its router row fitted on `calibration` ({NAME: FILE}; docs/add-experts.md).
    Keywords: ``AddExpertsOptions`` fields and ``OutputOptions`` fields. Returns a ``Result``
    (``result.plan.details["add_experts"]``)."""
    return _moe_to_moe("add_experts", "AddExpertsOptions", moe, out, dict(options, layout=layout))


def _moe_to_moe(operation: str, options_class: str, moe, out, options: dict):
    module = _module(operation)
    options = dict(options)
    output = _output(options)
    settings = _take(options, getattr(module, options_class))
    _refuse_rest(options, operation)
    with _silenced():
        return module.run(moe, out, settings, output)


# ---------------------------------------------------------------- reading
def inspect(path, *, tensors: bool = False, stats: bool = False):
    """A checkpoint's architecture, expert layout, parameter counts and problems, as an inspect
    ``Report`` (``report.to_json()`` is what ``surgery inspect --json`` prints)."""
    from surgery.checkpoint import Checkpoint

    analyse = _module("inspect").analyse
    with Checkpoint.open(path) as checkpoint:
        return analyse(checkpoint, tensors, None, stats)


def validate(model, references=(), *, data=None, text=None, tokens=None, batch_size: int = 8, seq_len: int = 256,
             max_tokens: int | None = None, device: str = "auto", dtype: str = "auto", expect_exact: bool = False,
             stream: bool | None = None, memory_budget: str | None = None) -> dict:
    """Loss of MODEL on a sample (and of each reference on the same tokens), routing statistics of an
    MoE, and with `expect_exact` the layer-by-layer comparison with the one reference (raises
    ``SurgeryError`` when it fails). Returns the report dict (what ``surgery validate --json`` prints)."""
    validate_function = _module("validate").validate
    with _silenced():
        return validate_function(str(model), [str(r) for r in references], data=data, text=text, tokens=tokens,
                                 batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens, device=device,
                                 dtype=dtype, expect_exact=expect_exact, stream=stream, memory_budget=memory_budget)


# ---------------------------------------------------------------- surgery.upcycle(...) and the module
class _CallableModule(type(_inspect)):
    """``surgery/upcycle.py`` is both the operation's module and, called, the API function of the same
    name: importing a submodule binds ``surgery.upcycle`` to the module, so the module itself must be
    what ``surgery.upcycle(...)`` calls."""

    def __call__(self, *args, **kwargs):
        return globals()[self.__name__.rsplit(".", 1)[1]](*args, **kwargs)


def callable_module(name: str, positional: list[str] = (), *classes, extra: dict | None = None) -> None:
    """Make module `name` callable as the API function of its last name. Its signature: the API
    function's own when no `classes` are given, else built from the options dataclasses `classes` (the
    command's own option names and defaults) and ``OutputOptions``."""
    import sys

    from surgery.operations.output import OutputOptions

    module = sys.modules[name]
    module.__class__ = _CallableModule
    if not classes:
        module.__signature__ = _inspect.signature(globals()[name.rsplit(".", 1)[1]])
        return
    parameters = [_inspect.Parameter(p, _inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in positional]
    seen = set(positional)
    for key, default in (extra or {}).items():
        parameters.append(_inspect.Parameter(key, _inspect.Parameter.KEYWORD_ONLY, default=default))
        seen.add(key)
    for cls in (*classes, OutputOptions):
        for field in dataclasses.fields(cls):
            if field.name in seen or field.name == "as_json":
                continue
            seen.add(field.name)
            default = field.default if field.default is not dataclasses.MISSING else _inspect.Parameter.empty
            parameters.append(_inspect.Parameter(field.name, _inspect.Parameter.KEYWORD_ONLY, default=default,
                                                 annotation=field.type))
    module.__signature__ = _inspect.Signature(parameters)


__all__ = ["copy", "upcycle", "split", "merge", "prune", "extract", "add_experts", "inspect", "validate"]
