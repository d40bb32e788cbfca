#!/usr/bin/env python3
"""Catalog every user-facing error surgery gives, and check that each is one line with exit code 2.

Builds every kind of bad input the tests know (tests/bad_inputs.py), the operation-argument
refusals the tests provoke (tests/test_upcycle.py, test_split.py, test_merge.py,
test_prune.py, test_extract.py, test_sliding_window.py) and the
environment failures (tests/test_copy.py, test_environment_failures.py), runs each through the
commands it applies to, and writes docs/errors.md: one table per group with the exit code and
the exact message.

Commands run the way the tests run them: in-process through ``surgery.cli.main`` (what the
``run_cli`` fixture does), except a full disk and signals mid-write, which need a real process
(``python3 -m surgery``), as in test_environment_failures.py.

    python3 scripts/error_catalog.py                 # writes docs/errors.md
    python3 scripts/error_catalog.py --check         # only check, write nothing
    python3 scripts/error_catalog.py --out FILE -v   # another output; print every case

Exit status 1 when any error case does not exit 2 with exactly one ``surgery: error: ...`` line on
stderr (or prints a traceback, or lacks the fragment the tests expect), or when a case that should
succeed (a warning, --allow-nonfinite) does not exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path[:0] = [str(REPO), str(TESTS)]  # the tests import their helpers as top-level modules
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # quiet save_pretrained while building inputs
os.environ["COLUMNS"] = "1000"  # rich wraps warnings at the terminal width; keep each on one line

PREFIX = "surgery: error: "
REGENERATE = "python3 scripts/error_catalog.py"
GROUPS = [  # (key, title, intro)
    ("safetensors", "Damaged safetensors files",
     "One `model.safetensors` corrupted in one way; every command refuses it before reading tensor data."),
    ("index", "Sharded checkpoints: the index and its shards",
     "A checkpoint saved in 20 KB shards, with `model.safetensors.index.json` or the shards made inconsistent."),
    ("config", "config.json",
     "`inspect` and `copy` need no config; a kind lists only the commands that refuse it."),
    ("pickle", "Pickle checkpoints",
     "Refused by file name and magic bytes, without unpickling anything."),
    ("arguments", "Operation arguments",
     "Impossible options, refused before anything is written. Sources are the tiny llama model of the "
     "tests (hidden 32, intermediate 44, no tokenizer), or the tiny model of the family a message names; "
     "merges use the tests' three domain copies a, b, c."),
    ("merge-sources", "Operation arguments: merge sources that do not fit together",
     "`merge --expert a=... --expert b=... --expert odd=...` where `odd` differs from the others in one "
     "respect (as in tests/test_merge.py)."),
    ("mergekit", "mergekit-moe configs",
     "`merge --config CONFIG` with a config of tests/mergekit_configs (the refused ones) or one written the way "
     "tests/test_mergekit_moe.py writes it, beside the tiny models it names (`models/NAME`)."),
    ("quantized", "Quantized checkpoints",
     "A tiny FP8 block-scaled Mixtral (blocks of 4 x 4) or MXFP4 gpt-oss (tests/quantized_models.py) made malformed "
     "in one way, or its quantization_config naming a scheme surgery does not read; refused when the checkpoint is "
     "opened, before any output exists (tests/test_quantized_fp8.py, test_quantized_mxfp4.py)."),
    ("environment", "Environment",
     "Outputs that exist or cannot be written, a full disk, signals mid-write, and NaN/Inf weights in a "
     "source. Rows with exit code 0 are not errors: they show the warning or the way out."),
]
CORPUS_GROUPS = {
    "safetensors": ["truncated", "header_longer_than_file", "header_not_json", "offsets_out_of_range",
                    "offsets_overlapping", "offsets_negative", "dtype_unknown", "size_mismatch",
                    "header_too_large", "empty_file"],
    "index": ["shard_missing", "tensor_in_absent_shard", "tensor_unlisted", "tensor_in_two_shards",
              "shard_path_traversal", "shard_path_absolute", "index_not_json"],
    "config": ["config_missing", "config_not_json", "architecture_unknown", "hidden_size_disagrees",
               "heads_do_not_divide"],
    "pickle": ["pickle_bin", "pickle_pt_file"],
    "environment": ["nonfinite_weight"],
}


# ------------------------------------------------------------------ running a command
def run_in_process(args) -> tuple[int, str, str]:
    """`surgery ARGS...` in this process, as the tests' run_cli fixture does: (exit code, stdout, stderr)."""
    from surgery.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # what a real process would show as a traceback with exit code 1
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def surgery_process(args) -> list[str]:
    return [sys.executable, "-m", "surgery", *map(str, args)]


# ------------------------------------------------------------------ cases and results
@dataclass
class Case:
    group: str
    kind: str
    command: str
    run: Callable[[Path, Fixtures], tuple[int, str, str]]  # (case directory, fixtures) -> result
    fragment: str | None = None  # what the tests expect in the message
    # error: exit 2 and one 'surgery: error: ...' line; warning: exit 0 and a warning line; success: exit 0
    expect: str = "error"


@dataclass
class Result:
    case: Case
    code: int
    stdout: str
    stderr: str
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def message(self) -> str:
        """The line the table shows: the error without its prefix, or the warning."""
        lines = self.lines
        if self.case.expect == "error":
            errors = [line for line in lines if line.startswith(PREFIX)]
            return (errors or lines or [""])[-1].removeprefix(PREFIX)
        warnings = [line for line in lines if "warning:" in line]
        return (warnings or lines or ["(nothing on stderr)"])[0]


def in_process(build) -> Callable:
    """A case runner from build(case_dir, fixtures) -> argument list."""
    return lambda d, fx: run_in_process(build(d, fx))


def check(result: Result) -> None:
    case, lines, problems = result.case, result.lines, result.problems
    if "Traceback" in result.stderr or "Traceback" in result.stdout:
        problems.append("traceback printed")
    if case.expect == "error":
        if result.code != 2:
            problems.append(f"exit code {result.code}, expected 2")
        if len(lines) != 1 or not lines[0].startswith(PREFIX):
            problems.append(f"{len(lines)} line(s) on stderr, expected one '{PREFIX}...' line")
    else:
        if result.code != 0:
            problems.append(f"exit code {result.code}, expected 0")
        if case.expect == "warning" and not any("warning:" in line for line in lines):
            problems.append("no warning printed")
    if case.fragment and case.fragment not in " ".join(result.stderr.split()):
        problems.append(f"message lacks {case.fragment!r}")


# ------------------------------------------------------------------ inputs (built once, copied per case)
class Fixtures:
    """Pristine tiny models, built once the way the tests build them; copy() puts one in a case dir."""

    def __init__(self, root: Path):
        self.root = root / "pristine"
        self.built: dict[str, Path] = {}

    def _get(self, name: str, build) -> Path:
        if name not in self.built:
            self.built[name] = build(self.root / name)
        return self.built[name]

    def model(self, name: str) -> Path:
        from quantized_models import save_fp8, save_mxfp4
        from tiny_models import save_model

        builders = {
            "single": lambda d: save_model(d, "llama"),
            "sharded": lambda d: save_model(d, "llama", max_shard_size="20KB"),
            "good": lambda d: save_model(d, "llama", seed=1),
            "mixtral": lambda d: save_model(d, "mixtral"),
            "qwen2_moe": lambda d: save_model(d, "qwen2_moe"),
            "qwen3": lambda d: save_model(d, "qwen3"),
            "llama-bias": lambda d: save_model(d, "llama", attention_bias=True),
            # layer 1 of 2 slides (tests/test_sliding_window.py)
            "qwen3-sliding": lambda d: save_model(d, "qwen3", use_sliding_window=True, sliding_window=4,
                                                  max_window_layers=1),
            "nonfinite": self._nonfinite,
            # Phi-4-mini style: rotary on 3/4 of each head (tests/test_phi3.py)
            "phi3-partial-rotary": lambda d: save_model(d, "phi3", head_dim=8, rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}),
            "mixtral-fused-bad-shape": self._fused_bad_shape,
            "mixtral-two-winners": self._two_winners,
            # 8 experts in n_group 2 groups, topk_group 1, top-2, an MTP layer (tests/test_hub_moes.py)
            "deepseek_v3": lambda d: save_model(d, "deepseek_v3"),
            "gpt_oss": lambda d: save_model(d, "gpt_oss"),
            "deepseek_v3-config-only": self._config_only,
            # quantized checkpoints (tests/quantized_models.py): a Mixtral in FP8 blocks of 4 x 4, a gpt-oss in MXFP4
            "mixtral-fp8": lambda d: save_fp8(d, "mixtral"),
            "gpt_oss-mxfp4": lambda d: save_mxfp4(d, seed=2),
            "llama4-no-text-config": self._nested_without_text_config,
        }
        return self._get(name, builders[name])

    def _config_only(self, directory: Path) -> Path:
        """A directory holding only a tiny DeepSeek-V3's config.json (tests/test_config_only.py)."""
        directory.mkdir(parents=True)
        shutil.copy(self.model("deepseek_v3") / "config.json", directory / "config.json")
        return directory

    def _nested_without_text_config(self, directory: Path) -> Path:
        """A tiny Llama4ForConditionalGeneration whose config.json lost its text_config (tests/test_nested.py)."""
        import json

        from tiny_models import save_nested

        save_nested(directory, "llama4")
        config = json.loads((directory / "config.json").read_text())
        del config["text_config"]
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    def _two_winners(self, directory: Path) -> Path:
        """A top-1 Mixtral whose routers never choose experts 1 and 3 (tests/test_prune.py)."""
        from test_prune import never_winning
        from tiny_models import save_model

        return never_winning(save_model(directory, "mixtral", num_experts_per_tok=1))

    def _fused_bad_shape(self, directory: Path) -> Path:
        """A Mixtral saved fused by transformers 5 whose layer-0 gate_up_proj lost its last up row."""
        from safetensors.torch import load_file, save_file
        from tiny_models import build_model

        build_model("mixtral").save_pretrained(directory, save_original_format=False)
        tensors = load_file(directory / "model.safetensors")
        name = "model.layers.0.mlp.experts.gate_up_proj"
        tensors[name] = tensors[name][:, :-1].contiguous()
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory

    def _nonfinite(self, directory: Path) -> Path:
        from bad_inputs import nonfinite_weight
        from tiny_models import save_model

        save_model(directory, "llama")
        nonfinite_weight(directory)
        return directory

    def member(self, name: str, **overrides) -> Path:
        """A merge member as test_merge.py builds them: seeds 0..3 for seed/a/b/c, a char tokenizer."""
        from test_merge import save_member

        seeds = {"seed": 0, "a": 1, "b": 2, "c": 3}
        return self._get(f"member-{name}", lambda d: save_member(d, seed=seeds[name], **overrides))

    def copy(self, source: Path, case_dir: Path, name: str) -> Path:
        target = case_dir / name
        shutil.copytree(source, target)
        return target

    def llama(self, case_dir: Path) -> Path:
        return self.copy(self.model("single"), case_dir, "src")

    def experts(self, case_dir: Path, names=("a", "b", "c")) -> list[str]:
        args = []
        for name in names:
            args += ["--expert", f"{name}={self.copy(self.member(name), case_dir, name)}"]
        return args

    def calibration(self, case_dir: Path, names) -> list[str]:
        from test_merge import TEXTS

        args = []
        for name in names:
            (case_dir / f"{name}.txt").write_text(TEXTS[name])
            args += ["--calibration", f"{name}={case_dir / f'{name}.txt'}"]
        return args


# ------------------------------------------------------------------ the corpus of bad inputs
def corpus_cases() -> list[Case]:
    from bad_inputs import CORPUS
    from test_bad_inputs import COMMAND_ARGS

    group_of = {name: group for group, names in CORPUS_GROUPS.items() for name in names}
    cases = []
    for kind, build, sharded, fragment, commands in CORPUS:
        group = group_of.get(build.__name__, "index" if kind.startswith("index") else "other")

        def run(d, fx, build=build, sharded=sharded, command=None):
            source = fx.copy(fx.model("sharded" if sharded else "single"), d, "src")
            good = fx.copy(fx.model("good"), d, "good")
            target = build(source) or source
            return run_in_process(COMMAND_ARGS[command](target, d / "out", good))

        for command in commands:
            cases.append(Case(group, kind, command, lambda d, fx, run=run, c=command: run(d, fx, command=c),
                              fragment))
    return cases


# ------------------------------------------------------------------ operation arguments
def upcycle(*options, source="single"):
    return in_process(lambda d, fx: ["upcycle", fx.copy(fx.model(source), d, "src"), d / "out", *options])


def split(*options):
    return in_process(lambda d, fx: ["split", fx.llama(d), d / "out", *options])


def prune(*options, source="mixtral"):
    return in_process(lambda d, fx: ["prune", fx.copy(fx.model(source), d, "src"), d / "out", *options])


def extract(*options, source="mixtral"):
    return in_process(lambda d, fx: ["extract", fx.copy(fx.model(source), d, "src"), d / "out", *options])


def add_experts(*options, dense=None):
    """add-experts on the tiny Mixtral; with `dense` (a fixture model name), it is expert x with a token file."""
    def run(d, fx):
        extra = []
        if dense is not None:
            (d / "x.jsonl").write_text("[3, 4, 5, 6, 7]\n")
            extra = ["--expert", f"x={fx.model(dense)}", "--calibration", f"x={d / 'x.jsonl'}"]
        return run_in_process(["add-experts", fx.copy(fx.model("mixtral"), d, "src"), d / "out", *extra, *options])
    return run


def prune_calibrated(*options):
    def run(d, fx):
        import json

        import torch

        generator = torch.Generator().manual_seed(3)  # as tests/conftest.py's token_file
        calibration = d / "calibration.jsonl"
        calibration.write_text("".join(json.dumps(torch.randint(3, 96, (40,), generator=generator).tolist()) + "\n"
                                       for _ in range(8)))
        return ["prune", fx.copy(fx.model("mixtral-two-winners"), d, "src"), d / "out", "--calibration", calibration,
                *options]
    return in_process(run)


def merge(*options, names=("a", "b", "c")):
    return in_process(lambda d, fx: ["merge", d / "out", *fx.experts(d, names), *options])


def with_file(name: str, content: bytes, make_args) -> Callable:
    """Write case_dir/name first; make_args(d, fx, path) -> argument list."""
    def run(d, fx):
        (d / name).write_bytes(content)
        return run_in_process(make_args(d, fx, d / name))
    return run


def calibration_text(content: bytes, strategy: str) -> Callable:
    return with_file("calibration.txt", content, lambda d, fx, path: [
        "split", fx.llama(d), d / "out", "-n", 4, "-k", 2, "--strategy", strategy, "--calibration", path])


def calibrated_upcycle(name: str, content: bytes, *extra) -> Callable:
    """test_execution.py / test_upcycle.py: upcycle with a calibrated router on the file case_dir/name."""
    return with_file(name, content, lambda d, fx, path: [
        "upcycle", fx.llama(d), d / "out", "-n", 4, "-k", 2, "--router-init", "calibrated", "--calibration", path,
        *extra])


def partition_for(experts: int, wide: bool) -> Callable:
    """test_split.py: a partition saved for 4 experts of the llama model, reused with -n 2 or on a wider FFN."""
    def run(d, fx):
        from tiny_models import save_model

        source = fx.llama(d)
        code, _, err = run_in_process(["split", source, d / "first", "-n", 4, "-k", 2, "--strategy", "random",
                                       "--save-partition", d / "p.json"])
        if code != 0:
            return code, "", err
        shutil.rmtree(d / "first")
        if wide:
            source = save_model(d / "wide", "llama", intermediate_size=48)
        return run_in_process(["split", source, d / "out", "-n", experts, "-k", 2, "--partition", d / "p.json"])
    return run


def odd_member(overrides=None, family="llama", tokenizer=False, edit=None, names=("a", "b"),
               router_zero=False) -> Callable:
    """test_merge.py: merge a, b and `odd`, a model that differs in one respect."""
    def run(d, fx):
        from test_merge import save_member

        odd = save_member(d / "odd", family, seed=7 if overrides else 5, tokenizer=tokenizer, **(overrides or {}))
        if edit:
            edit(odd)
        args = ["merge", d / "out", *fx.experts(d, names), "--expert", f"odd={odd}"]
        return run_in_process(args + (["--router-init", "zero"] if router_zero else []))
    return run


def change_tokenizer(odd: Path) -> None:
    (odd / "tokenizer.json").write_text((odd / "tokenizer.json").read_text().replace('"x"', '"X"', 1))


def shorten_up_proj(odd: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(odd / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:40]
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})


def merge_calibration_missing(d, fx):
    return run_in_process(["merge", d / "out", *fx.experts(d), *fx.calibration(d, ("a", "b")),
                           "--router-init", "calibrated"])


def merge_head_fit_one_model_averaged(d, fx):
    return run_in_process(["merge", d / "out", *fx.experts(d), *fx.calibration(d, ("a", "b", "c")), "--head-fit",
                           "--weights", "b=0,c=0"])


def merge_yaml_head_fit_not_a_choice(d, fx):
    experts = fx.experts(d, ("a",))
    (d / "m.yml").write_text(f"experts:\n  - {{name: a, path: {experts[1].split('=', 1)[1]}}}\nhead_fit: sometimes\n")
    return run_in_process(["merge", d / "out", "--config", d / "m.yml"])


def merge_unknown_yaml_key(d, fx):
    experts = fx.experts(d, ("a",))
    (d / "m.yml").write_text(f"experts:\n  - {{name: a, path: {experts[1].split('=', 1)[1]}}}\nexpert_count: 3\n")
    return run_in_process(["merge", d / "out", "--config", d / "m.yml"])


def argument_cases() -> list[Case]:
    A, M = "arguments", "merge-sources"
    R = "--strategy", "random"
    rows = [
        # (group, kind, command, runner, fragment the tests check)
        (A, "K > N (--top-k above --num-experts)", "upcycle", upcycle("-n", 4, "-k", 5),
         "--top-k 5: must be between 1 and --num-experts (4)"),
        (A, "K > N (--top-k above --num-experts)", "split", split("-n", 4, "-k", 5, *R),
         "--top-k 5: must be between 1 and --num-experts (4)"),
        (A, "K > N (--top-k above --num-experts)", "merge", merge("--top-k", 4),
         "--top-k 4: must be between 1 and the number of experts (3)"),
        (A, "K < 1", "merge", merge("--top-k", 0), "--top-k 0: must be between 1"),
        (A, "N < 2 (fewer than two experts)", "upcycle", upcycle("-n", 1, "-k", 1),
         "--num-experts 1: an MoE layer needs at least 2 experts"),
        (A, "N < 2 (fewer than two experts)", "split", split("-n", 1, "-k", 1, *R), "at least 2 experts"),
        (A, "N < 2 (fewer than two experts)", "merge", merge("--top-k", 1, names=("a",)),
         "a merge needs at least 2 experts, found 1"),
        (A, "more experts than FFN neurons", "split", split("-n", 45, "-k", 2, *R),
         "more experts than the FFN has neurons"),
        (A, "--granularity does not divide intermediate_size", "upcycle", upcycle("-n", 6, "-k", 3, "-g", 3),
         "intermediate_size 44 is not divisible by --granularity 3"),
        (A, "--top-k not a multiple of --granularity", "upcycle", upcycle("-n", 4, "-k", 1, "-g", 2),
         "--top-k 1 is not a multiple of --granularity 2"),
        (A, "--num-experts not a multiple of --granularity", "upcycle", upcycle("-n", 6, "-k", 2, "-g", 4),
         "--num-experts 6 is not a multiple of --granularity 4"),
        (A, "zero router with granular experts", "upcycle", upcycle("-n", 4, "-k", 2, "-g", 2, "--router-init", "zero"),
         "a zero router ties every expert"),
        (A, "unknown --strategy", "split", split("-n", 4, "-k", 2, "--strategy", "kmeans"),
         "--strategy 'kmeans' is not a split strategy"),
        (A, "--strategy missing", "split", split("-n", 4, "-k", 2), "--strategy is required"),
        (A, "unknown --router-init", "split", split("-n", 4, "-k", 2, *R, "--router-init", "hash"),
         "--router-init 'hash'"),
        (A, "unknown --router-init", "upcycle", upcycle("-n", 4, "-k", 2, "--router-init", "hash"), "'hash'"),
        (A, "unknown --router-init", "merge", merge("--router-init", "hash"), "'hash'"),
        (A, "unknown option", "copy", in_process(lambda d, fx: ["copy", d, d / "o", "--no-such-option"]),
         "No such option"),
        (A, "--moe-layers with a format that is all-MoE", "upcycle", upcycle("-n", 4, "-k", 2, "--moe-layers", 1),
         "mixtral makes every layer MoE; --moe-layers must be 'all'"),
        (A, "--shared-expert with a format that has none", "upcycle", upcycle("-n", 4, "-k", 2, "--shared-expert"),
         "format mixtral has no shared expert"),
        (A, "--format of another family", "upcycle", upcycle("-n", 4, "-k", 2, "--format", "qwen3_moe"),
         "a llama model cannot become qwen3_moe"),
        (A, "--format of another family", "split", split("-n", 4, "-k", 2, *R, "--format", "qwen3_moe"),
         "a llama model cannot become qwen3_moe"),
        (A, "source bias weights the format cannot hold", "upcycle", upcycle("-n", 4, "-k", 2, source="llama-bias"),
         "attention_bias is true, but mixtral has no such weights"),
        (A, "source sliding window the format cannot reproduce", "upcycle",
         upcycle("-n", 4, "-k", 2, source="qwen3-sliding"),
         "but qwen3_moe applies one sliding window to every layer or to none, so the result could not reproduce"),
        (A, "source rope the format cannot reproduce (partial rotary)", "upcycle",
         upcycle("-n", 4, "-k", 2, source="phi3-partial-rotary"),
         "rope_parameters.partial_rotary_factor is 0.75, but mixtral's attention rotates every dimension"),
        (A, "--norm-topk-prob for a format that always renormalises", "copy",
         in_process(lambda d, fx: ["copy", fx.model("mixtral"), d / "out", "--norm-topk-prob", "false"]),
         "--norm-topk-prob: mixtral always renormalises its top-k weights"),
        (A, "--top-k beyond the expert count (copy)", "copy",
         in_process(lambda d, fx: ["copy", fx.model("mixtral"), d / "out", "--top-k", 5]),
         "--top-k 5: must be between 1 and the number of experts (4)"),
        (A, "--layout fused for a dense output", "copy",
         in_process(lambda d, fx: ["copy", fx.llama(d), d / "out", "--layout", "fused"]),
         "--layout fused: the output is a LlamaForCausalLM, which has no experts to fuse"),
        (A, "fused expert tensor of the wrong shape", "copy",
         in_process(lambda d, fx: ["copy", fx.model("mixtral-fused-bad-shape"), d / "out", "--layout", "per-expert"]),
         "model.layers.0.mlp.experts.gate_up_proj"),
        (A, "source is already an MoE model", "upcycle", upcycle("-n", 4, "-k", 2, source="mixtral"),
         "already an MoE model"),
        (A, "--noise-fraction outside [0, 1]", "upcycle", upcycle("-n", 4, "-k", 2, "--noise", 0.1, "--noise-fraction", 1.5),
         "--noise-fraction 1.5: must be a fraction"),
        (A, "--drop-upcycle outside [0, 1]", "upcycle", upcycle("-n", 4, "-k", 2, "--drop-upcycle", -0.1),
         "--drop-upcycle -0.1: must be a fraction"),
        (A, "--noise-fraction without --noise", "upcycle", upcycle("-n", 4, "-k", 2, "--noise-fraction", 0.5),
         "--noise-fraction needs --noise SIGMA"),
        (A, "negative --seed", "upcycle", upcycle("-n", 4, "-k", 2, "--seed", -1),
         "--seed -1: must be a non-negative integer"),
        (A, "--shared-neurons out of range", "split", split("-n", 4, "-k", 2, *R, "--shared-neurons", 41),
         "expected 0 to 40 shared neurons"),
        (A, "--shared-neurons and --shared-fraction together", "split",
         split("-n", 4, "-k", 2, *R, "--shared-neurons", 4, "--shared-fraction", 0.1), "give one"),
        (A, "bad --expert-scale", "split", split("-n", 4, "-k", 2, *R, "--expert-scale", "-1"), "--expert-scale '-1'"),
        (A, "--partition saved for another --num-experts", "split", partition_for(2, wide=False),
         "holds 4 experts, --num-experts is 2"),
        (A, "--partition saved for another model", "split", partition_for(4, wide=True),
         "made for intermediate_size 44, the model has 48"),
        (A, "--calibration without --router-init calibrated", "upcycle",
         upcycle("-n", 4, "-k", 2, "--calibration", "x.txt"), "--calibration applies to --router-init calibrated only"),
        (A, "calibration text file empty", "split (sharing-inner)", calibration_text(b"  \n", "sharing-inner"), "text file is empty"),
        (A, "calibration text file empty", "split (coactivation)", calibration_text(b"  \n", "coactivation"),
         "text file is empty"),
        (A, "calibration file not text", "split (sharing-inner)", calibration_text(b"\x00\x01binary", "sharing-inner"),
         "not a text file"),
        (A, "calibration file not text", "split (coactivation)", calibration_text(b"\x00\x01binary", "coactivation"),
         "not a text file"),
        (A, "calibration text but the source has no tokenizer", "upcycle",
         calibrated_upcycle("text.txt", b"some calibration text\n"), "no tokenizer"),
        (A, "calibration text but the source has no tokenizer", "split",
         with_file("calibration.txt", b"some text", lambda d, fx, p: [
             "split", fx.llama(d), d / "out", "-n", 4, "-k", 2, *R, "--router-init", "calibrated", "--calibration", p]),
         "no tokenizer files"),
        (A, "calibration token id beyond the vocabulary", "upcycle",
         calibrated_upcycle("ids.jsonl", b"[3, 4, 500]\n"), "token id 500 is out of range for a vocabulary of 96"),
        (A, "calibration that holds only padding", "split (coactivation)",
         with_file("ids.jsonl", b"[0, 0, 0]\n[0, 0]\n", lambda d, fx, p: [
             "split", fx.llama(d), d / "out", "-n", 4, "-k", 2, "--strategy", "coactivation", "--calibration", p]),
         "holds only the padding token (id 0)"),
        (A, "--device cuda without a GPU", "upcycle",
         upcycle("-n", 4, "-k", 2, "--router-init", "calibrated", "--device", "cuda"), "no CUDA device is available"),
        (A, "--memory-budget smaller than one layer", "upcycle",
         calibrated_upcycle("ids.jsonl", b"[3, 4, 5, 6]\n", "--memory-budget", "1KB"), "is too small to run one layer"),
        (A, "--memory-budget not a size", "split", split("-n", 4, "-k", 2, "--strategy", "random", "--memory-budget", "lots"),
         "expected auto or a size such as 4GiB"),
        (A, "calibrated router without text for every expert", "merge", merge_calibration_missing, "missing for c"),
        (A, "--non-ffn not a method nor an expert", "merge", merge("--non-ffn", "zz"),
         "--non-ffn 'zz': expected auto, average, regmean, regmean++, seed or an expert name"),
        (A, "--non-ffn seed without --seed", "merge", merge("--non-ffn", "seed"), "--non-ffn seed needs --seed PATH"),
        (A, "--non-ffn regmean++ without calibrated routers", "merge",
         merge("--non-ffn", "regmean++", "--router-init", "normal"),
         "--non-ffn regmean++ takes its inputs from the merged model"),
        (A, "--head-fit without a RegMean++ merge", "merge", merge("--head-fit", "--non-ffn", "average"),
         "--head-fit refits the head of a RegMean++ merge"),
        (A, "--head-fit with the head copied from the one model averaged", "merge", merge_head_fit_one_model_averaged,
         "only one model's non-FFN weights are averaged here"),
        (A, "--include-seed without --seed", "merge", merge("--include-seed"), "--include-seed needs --seed PATH"),
        (A, "--weights names an unknown model", "merge", merge("--weights", "zz=1"),
         "--weights names 'zz', which is not a model of this merge"),
        (A, "--weights negative", "merge", merge("--weights", "a=-1"), "weight must be a finite number >= 0"),
        (A, "expert name given twice", "merge", merge("--expert", "a=/elsewhere"), "expert name 'a' is given twice"),
        (A, "unknown key in the merge YAML", "merge", merge_unknown_yaml_key, "unknown key 'expert_count'"),
        (A, "head_fit in the merge YAML neither auto, true nor false", "merge", merge_yaml_head_fit_not_a_choice,
         "head_fit: expected auto, true or false, found 'sometimes'"),
        (A, "--keep not below the expert count", "prune", prune("--keep", 4, "--criterion", "random"),
         "--keep 4: must be below the source's 4 experts per MoE layer"),
        (A, "--keep below the top-k without --top-k", "prune", prune("--keep", 1, "--criterion", "random"),
         "--keep 1 is below the source's top-k (2): give --top-k K"),
        (A, "--top-k above the kept count", "prune", prune("--keep", 2, "--top-k", 3, "--criterion", "random"),
         "--top-k 3 exceeds the 2 experts kept per layer"),
        (A, "neither --keep nor --ratio", "prune", prune("--criterion", "random"), "give one of --keep N and --ratio R"),
        (A, "--ratio outside [0, 1)", "prune", prune("--ratio", 1, "--criterion", "random"), "expected 0 <= R < 1"),
        (A, "a dense model to prune", "prune", prune("--keep", 2, "--criterion", "random", source="single"),
         "prune needs an MoE checkpoint"),
        (A, "--keep not a multiple of n_group (group-limited routing)", "prune",
         prune("--keep", 5, "--criterion", "random", source="deepseek_v3"),
         "--keep 5: n_group = 2, and every group must keep the same number of experts"),
        (A, "a group left with fewer experts than its score sums", "prune",
         prune("--keep", 2, "--top-k", 1, "--criterion", "random", source="deepseek_v3"),
         "each group must keep at least 2 (4 experts)"),
        (A, "copy --top-k beyond the experts of the groups a token may use", "copy",
         in_process(lambda d, fx: ["copy", fx.model("deepseek_v3"), d / "out", "--top-k", 5]),
         "--top-k 5: a token may use 1 of 2 expert groups (topk_group), 4 experts in all"),
        (A, "weights needed from a directory holding only config.json", "prune",
         in_process(lambda d, fx: ["prune", fx.model("deepseek_v3-config-only"), d / "out", "--keep", 4,
                                   "--criterion", "random"]),
         "holds only config.json, no weights"),
        (A, "a calibrated criterion in a config-only dry run", "prune",
         in_process(lambda d, fx: ["prune", fx.model("deepseek_v3-config-only"), d / "out", "--keep", 4,
                                   "--dry-run"]),
         "--criterion reap runs the model on calibration text"),
        (A, "a multimodal config without its text model's config", "inspect",
         in_process(lambda d, fx: ["inspect", fx.model("llama4-no-text-config")]),
         "a Llama4ForConditionalGeneration config needs a 'text_config' object"),
        (A, "an MoE family with no dense form in transformers", "extract", extract("--expert", 0, source="gpt_oss"),
         "extract: a GptOssForCausalLM has no dense form in transformers ("),
        (A, "a dense model to extract", "extract", extract("--expert", 0, source="single"),
         "extract needs an MoE checkpoint"),
        (A, "--expert out of range", "extract", extract("--expert", 4), "--expert 4: the source has experts 0-3"),
        (A, "neither --expert nor --average", "extract", extract(), "give one of --expert E and --average"),
        (A, "a gated shared expert without --shared-gate", "extract", extract("--expert", 0, source="qwen2_moe"),
         "give --shared-gate fold"),
        (A, "--shared-gate without a shared expert", "extract", extract("--expert", 0, "--shared-gate", "drop"),
         "the source has no shared expert"),
        (A, "no --expert", "add-experts", add_experts(), "give at least one --expert NAME=DENSE"),
        (A, "a dense model of another family", "add-experts", add_experts(dense="qwen3"),
         "architecture is Qwen3ForCausalLM in x, but a MixtralForCausalLM takes experts from LlamaForCausalLM or "
         "MistralForCausalLM or Phi3ForCausalLM models"),
        (M, "different tensor shape", "merge", odd_member(edit=shorten_up_proj, names=("a",)),
         "'model.layers.0.mlp.up_proj.weight' has shape [40, 32]"),
        (M, "different intermediate_size", "merge", odd_member({"intermediate_size": 40}, router_zero=True),
         "intermediate_size"),
        (M, "different vocab_size", "merge", odd_member({"vocab_size": 100}, router_zero=True), "vocab_size"),
        (M, "different rope", "merge", odd_member({"rope_theta": 500000.0}, router_zero=True), "rope"),
        (M, "different rms_norm_eps", "merge", odd_member({"rms_norm_eps": 1e-5}, router_zero=True), "rms_norm_eps"),
        (M, "different hidden_act", "merge", odd_member({"hidden_act": "gelu"}, router_zero=True), "hidden_act"),
        (M, "different head_dim", "merge", odd_member({"head_dim": 16}, router_zero=True), "head_dim"),
        (M, "different architecture", "merge", odd_member(family="qwen2", names=("a",)),
         "architecture is Qwen2ForCausalLM in odd, but LlamaForCausalLM in a"),
        (M, "different tokenizer", "merge", odd_member(tokenizer=True, edit=change_tokenizer),
         "tokenizer file tokenizer.json differs between odd and a"),
    ]
    return [Case(group, kind, command, runner, fragment, "error") for group, kind, command, runner, fragment in rows]


# ------------------------------------------------------------------ mergekit-moe configs
def mergekit_config(config: str | None = None, text: str | None = None, args=()) -> Callable:
    """`merge --config` with tests/mergekit_configs/CONFIG.yml, or a config `text`, beside the tiny models the
    corpus names (models/NAME, built as tests/test_mergekit_configs.py builds them)."""
    def run(d, fx):
        from test_merge import save_member
        from test_mergekit_configs import CORPUS, MODELS

        text_ = text if text is not None else (CORPUS / f"{config}.yml").read_text()
        for name, (family, seed) in MODELS.items():
            if f"models/{name}\n" in text_ or f"models/{name}+" in text_:
                fx.copy(fx._get(f"corpus-{name}", lambda p, f=family, s=seed: save_member(p, f, seed=s)), d / "models",
                        name)
        if "models/other_tokenizer" in text_:
            other = fx.copy(fx._get("corpus-a", lambda p: save_member(p, "llama", seed=1)), d / "models",
                            "other_tokenizer")
            change_tokenizer(other)
        (d / "config.yml").write_text(text_)
        return run_in_process(["merge", d / "out", "--config", d / "config.yml", *args])
    return run


def mergekit_cases() -> list[Case]:
    from test_mergekit_configs import REFUSED

    K = "mergekit"
    three = "base_model: models/base\ngate_mode: {gate}\nexperts:\n{experts}"
    kinds = {"refused_deepseek": "architecture: deepseek", "refused_hub_id": "a hub model id as base_model",
             "refused_lora": "a LoRA adapter (MODEL+LORA)", "refused_merge_method": "a key mergekit-moe does not read",
             "refused_other_tokenizer": "tokenizer_source with another tokenizer",
             "refused_shared_expert_mixtral": "shared_experts with architecture: mixtral",
             "refused_tokenizer_tokens": "tokenizer.tokens", "refused_two_shared_experts": "two shared_experts"}
    rows = [(K, kinds[name], mergekit_config(name), fragment) for name, fragment in sorted(REFUSED.items())]
    rows += [
        (K, "experts_per_token above the number of experts", mergekit_config(text=three.format(
            gate="random", experts="  - source_model: models/a\n  - source_model: models/b\n") + "experts_per_token: 3\n"),
         "experts_per_token 3: must be between 1 and the number of experts (2)"),
        (K, "gate_mode hidden with an expert without prompts", mergekit_config(text=three.format(
            gate="hidden", experts="  - source_model: models/a\n    positive_prompts: [code]\n"
                                   "  - source_model: models/b\n")),
         "gate_mode hidden needs positive_prompts for every expert; missing for b (give experts[1].positive_prompts)"),
        (K, "shared expert prompts with gate_mode cheap_embed", mergekit_config(text=three.format(
            gate="cheap_embed", experts="  - source_model: models/a\n    positive_prompts: [code]\n"
                                        "  - source_model: models/b\n    positive_prompts: [prose]\n")
            + "shared_experts:\n  - source_model: models/c\n    positive_prompts: [chat]\n"),
         "shared_experts[0].positive_prompts: the shared expert's gate is fitted on text only with calibrated routers"),
        (K, "gate_mode unknown", mergekit_config(text=three.format(
            gate="hidden_mean", experts="  - source_model: models/a\n  - source_model: models/b\n")),
         "gate_mode 'hidden_mean' is not understood"),
        (K, "noise_scale negative", mergekit_config(text=three.format(
            gate="random", experts="  - source_model: models/a\n    noise_scale: -0.1\n  - source_model: models/b\n")),
         "experts[0].noise_scale: expected a number >= 0, found -0.1"),
        (K, "dtype float64", mergekit_config(text=three.format(
            gate="random", experts="  - source_model: models/a\n  - source_model: models/b\n") + "dtype: float64\n"),
         "dtype 'float64' is not supported (expected bfloat16, float16 or float32)"),
        (K, "--weights for the second name of one directory", in_process(lambda d, fx: [
            "merge", d / "out", "--expert", f"x={fx.copy(fx.member('a'), d, 'a')}", "--expert", f"y={d / 'a'}",
            "--expert", f"b={fx.copy(fx.member('b'), d, 'b')}", "--weights", "y=2"]),
         "--weights names y, the same directory as x"),
    ]
    return [Case(group, kind, "merge", runner, fragment, "error") for group, kind, runner, fragment in rows]


# ------------------------------------------------------------------ environment
def existing_output(command):
    def run(d, fx):
        (d / "out").mkdir()
        (d / "out" / "keep.txt").write_text("mine")
        return run_in_process(writing_args(command, d, fx, d / "out"))
    return run


def output_inside_input(command):
    return lambda d, fx: run_in_process(writing_args(command, d, fx, None))


def unwritable_output(command):
    return lambda d, fx: run_in_process(writing_args(command, d, fx, Path("/proc/surgery-output")))


def writing_args(command, d, fx, out):
    """A valid command that writes `out` (None: a directory inside the first input)."""
    if command == "merge":
        experts = fx.experts(d, ("a", "b"))
        out = out or Path(experts[1].split("=", 1)[1]) / "nested"
        return ["merge", out, *experts, "--router-init", "zero"]
    source = fx.llama(d)
    out = out or source / "nested"
    extra = {"copy": [], "upcycle": ["-n", 4, "-k", 2], "split": ["-n", 4, "-k", 2, "--strategy", "random"]}
    return [command, source, out, *extra[command]]


def disk_full(d, fx):
    source = fx.llama(d)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    result = subprocess.run(surgery_process(["copy", source, d / "out"]), capture_output=True, text=True,
                            preexec_fn=limit_file_size)
    return result.returncode, result.stdout, result.stderr


def signal_mid_write(signum):
    def run(d, fx):
        source = fx.llama(d)
        process = subprocess.Popen(surgery_process(["copy", source, d / "out", "--dtype", "bf16"]),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not any(p.name.startswith(".out.surgery-tmp") for p in d.iterdir()):
            if process.poll() is not None or time.time() > deadline:
                out, err = process.communicate()
                return process.returncode, out, err + "\n(catalog: the write finished before the signal)"
            time.sleep(0.005)
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
        return process.returncode, out, err
    return run


def nonfinite(args_of):
    return lambda d, fx: run_in_process(args_of(fx.copy(fx.model("nonfinite"), d, "src"), d))


def quantized_cases() -> list[Case]:
    from quantized_models import MXFP4_CORPUS, QUANTIZED_COMMANDS, QUANTIZED_CORPUS

    def runner(model, corrupt, command):
        def run(d, fx):
            source = fx.copy(fx.model(model), d, "src")
            corrupt(source)
            (d / "ids.jsonl").write_text("".join(f"[{', '.join(str(3 + (i * 7 + j) % 90) for j in range(16))}]\n"
                                                 for i in range(4)))
            args = {"inspect": [], "copy": [d / "out"], "validate": ["--tokens", d / "ids.jsonl"],
                    "prune": [d / "out", "--ratio", "0.5", "--calibration", d / "ids.jsonl"]}[command]
            return run_in_process([command, source, *args])
        return run

    cases = []
    for model, corpus, commands in (("mixtral-fp8", QUANTIZED_CORPUS, QUANTIZED_COMMANDS),
                                    ("gpt_oss-mxfp4", MXFP4_CORPUS, ("inspect", "copy", "prune"))):
        for kind, corrupt, fragment in corpus:
            for command in commands:
                cases.append(Case("quantized", kind, command, runner(model, corrupt, command), fragment))
    return cases


def environment_cases() -> list[Case]:
    from test_bad_inputs import COMMAND_ARGS

    E = "environment"
    cases = []
    for command in COMMAND_ARGS:  # tests/test_cli.py: `inspect <missing>`; here every command
        cases.append(Case(E, "input path does not exist", command, lambda d, fx, c=command: run_in_process(
            COMMAND_ARGS[c](d / "nothing", d / "out", fx.copy(fx.model("good"), d, "good"))),
            "nothing: no such file or directory"))
    for command in ("copy", "upcycle", "split", "merge"):
        cases.append(Case(E, "output already exists", command, existing_output(command),
                          "output already exists (use --force"))
    for command in ("copy", "upcycle", "split", "merge"):
        cases.append(Case(E, "output inside the input", command, output_inside_input(command),
                          "output is inside the input"))
    for command in ("copy", "upcycle", "split", "merge"):
        cases.append(Case(E, "output location not writable (/proc/surgery-output)", command,
                          unwritable_output(command), "/proc/surgery-output: cannot create a directory beside it"))
    cases += [
        Case(E, "disk full during the write (RLIMIT_FSIZE 60 KB)", "copy", disk_full, "File too large"),
        Case(E, "SIGTERM mid-write", "copy", signal_mid_write(signal.SIGTERM), "interrupted by SIGTERM"),
        Case(E, "SIGINT (Ctrl-C) mid-write", "copy", signal_mid_write(signal.SIGINT), "interrupted by SIGINT"),
        Case(E, "NaN/Inf weight: inspect --stats warns", "inspect",
             nonfinite(lambda src, d: ["inspect", src, "--stats"]), "has 0 NaN and 1 Inf", expect="warning"),
        Case(E, "NaN/Inf weight: validate --structure-only", "validate",
             nonfinite(lambda src, d: ["validate", src, "--structure-only"]), "has 0 NaN and 1 Inf"),
        Case(E, "NaN/Inf weight: verify", "verify", nonfinite(lambda src, d: ["verify", src]),
             "has 0 NaN and 1 Inf"),
        Case(E, "NaN/Inf weight: written anyway with --allow-nonfinite", "copy",
             nonfinite(lambda src, d: ["copy", src, d / "out", "--allow-nonfinite"]), expect="success"),
    ]
    return cases


# ------------------------------------------------------------------ the document
def stable(text: str, case_dir: Path, root: Path) -> str:
    for directory in (case_dir, root):
        for form in {str(directory), os.path.realpath(directory)}:
            text = text.replace(form + os.sep, "<tmp>/").replace(form, "<tmp>")
    text = re.sub(r"surgery-tmp-\d+", "surgery-tmp-<pid>", text)  # temporary names carry the process id
    return re.sub(r"\(\d+\.\d s, \d+ MB/s\)", "(<time>, <speed>)", text)  # `wrote ...` timings


def cell(text: str) -> str:
    text = text.replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def note_for(result: Result) -> str:
    """What else the case printed, beyond the one line the table shows."""
    extra = []
    others = len(result.lines) - 1
    if others > 0:
        extra.append(f"{others} more line{'s' if others != 1 else ''} on stderr")
    if result.stdout.strip():
        extra.append("a report on stdout")
    if result.problems:
        extra.append("**" + "; ".join(result.problems) + "**")
    return f" <br>_({', '.join(extra)})_" if extra else ""


def row(results: list[Result]) -> str:
    kind = results[0].case.kind
    commands = ", ".join(r.case.command for r in results)
    codes = sorted({r.code for r in results})
    code = ", ".join(map(str, codes)) if len(codes) > 1 else str(codes[0])
    by_message: dict[tuple[str, str], list[str]] = {}
    for r in results:
        by_message.setdefault((r.message, note_for(r)), []).append(r.case.command)
    if len(by_message) == 1:
        (message, note), = by_message
        text = cell(message) + note
    else:
        text = " <br>".join(f"{', '.join(names)}: {cell(message)}{note}"
                            for (message, note), names in by_message.items())
    return f"| {kind} | {commands} | {code} | {text} |"


def document(results: list[Result], summary: str) -> str:
    lines = [
        "# Error catalog",
        "",
        "Every user-facing failure of `surgery` is one line on stderr, `surgery: error: <message>`, with exit "
        "code 2 (`-v` adds the traceback). The tables below show the `<message>` part for every kind of bad "
        "input, impossible option and environment failure the test suite provokes, run through every command "
        "it applies to. Where commands word the message differently, each wording is shown with its commands.",
        "",
        f"Generated by `{REGENERATE}`, which builds each case the way "
        "the tests do (tests/bad_inputs.py, tests/test_bad_inputs.py, tests/test_upcycle.py, "
        "tests/test_split.py, tests/test_merge.py, tests/test_sliding_window.py, tests/test_copy.py, "
        "tests/test_environment_failures.py) in a "
        "temporary directory, shown as `<tmp>/`; `src` is the input, `good` a second valid model, `out` the "
        "output. The script exits non-zero when any error case does not exit 2 with exactly one line, so it "
        "doubles as a check.",
        "",
        "Do not edit this file by hand; regenerate it.",
        "",
        f"Last run: {summary}",
        "",
    ]
    by_group: dict[str, dict[str, list[Result]]] = {}
    for result in results:
        by_group.setdefault(result.case.group, {}).setdefault(result.case.kind, []).append(result)
    known = [g for g, _, _ in GROUPS]
    titles = GROUPS + [(g, g.capitalize(), "") for g in by_group if g not in known]
    for key, title, intro in titles:
        if key not in by_group:
            continue
        lines += [f"## {title}", ""]
        if intro:
            lines += [intro, ""]
        lines += ["| kind | commands | exit code | message |", "|---|---|---|---|"]
        kinds = sorted(by_group[key].values(), key=lambda rs: rs[0].case.kind.startswith("NaN/Inf"))  # NaN rows together
        lines += [row(kind_results) for kind_results in kinds]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "errors.md", help="Markdown file to write.")
    parser.add_argument("--check", action="store_true", help="Run and check every case; write nothing.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Print every case as it runs.")
    options = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # tiny models: threads only cost (as in tests/test_split.py)
    started = time.perf_counter()
    cases = corpus_cases() + argument_cases() + mergekit_cases() + quantized_cases() + environment_cases()
    results = []
    with tempfile.TemporaryDirectory(prefix="surgery-errors-") as tmp:
        root = Path(tmp)
        fixtures = Fixtures(root)
        for number, case in enumerate(cases):
            case_dir = root / f"case-{number:03d}"
            case_dir.mkdir()
            t0 = time.perf_counter()
            try:
                code, stdout, stderr = case.run(case_dir, fixtures)
            except Exception:  # a broken builder, not a surgery result: report it as a failed case
                code, stdout, stderr = -1, "", "catalog: building the case failed\n" + traceback.format_exc()
            result = Result(case, code, stable(stdout, case_dir, root), stable(stderr, case_dir, root),
                            time.perf_counter() - t0)
            check(result)
            results.append(result)
            if options.verbose or result.problems:
                status = "FAIL " + "; ".join(result.problems) if result.problems else "ok"
                print(f"[{number + 1}/{len(cases)}] {case.kind} | {case.command}: exit {code} "
                      f"({result.seconds:.1f} s) {status}\n    {result.message}", file=sys.stderr)
            shutil.rmtree(case_dir, ignore_errors=True)
    seconds = time.perf_counter() - started

    failed = [r for r in results if r.problems]
    errors = [r for r in results if r.case.expect == "error"]
    fine = len(results) - len(errors)
    kinds = len({(r.case.group, r.case.kind) for r in results})
    if failed:
        summary = (f"{kinds} kinds, {len(results)} cases: {len(failed)} FAILED ({len(errors)} error cases, "
                   f"{fine} warning/success cases)")
    else:
        summary = (f"{kinds} kinds, {len(results)} cases: all {len(errors)} refusals exit 2 with one line; "
                   f"{fine} warning/success cases exit 0")
    if not options.check:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(document(results, summary))
    for result in failed:
        print(f"FAILED {result.case.kind} | {result.case.command}: {'; '.join(result.problems)}\n"
              f"    stderr: {result.stderr.strip()[-800:]}", file=sys.stderr)
    print(f"{summary} ({seconds:.0f} s){'' if options.check else f'; wrote {options.out}'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
