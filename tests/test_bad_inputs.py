"""Every kind of bad input, through every command it applies to: a one-line error naming what is
wrong, exit code 2, no traceback, inputs byte-identical afterwards, no output left behind."""

import hashlib
import shutil

import pytest
from bad_inputs import CORPUS
from tiny_models import save_model

COMMAND_ARGS = {
    "inspect": lambda src, out, good: ["inspect", src],
    "copy": lambda src, out, good: ["copy", src, out],
    "upcycle": lambda src, out, good: ["upcycle", src, out, "--num-experts", "4", "--top-k", "2"],
    "split": lambda src, out, good: ["split", src, out, "--num-experts", "4", "--top-k", "2", "--strategy", "random"],
    "merge": lambda src, out, good: ["merge", out, "--expert", f"bad={src}", "--expert", f"good={good}"],
    "validate": lambda src, out, good: ["validate", src],
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return {"single": save_model(root / "single", "llama"),
            "sharded": save_model(root / "sharded", "llama", max_shard_size="20KB"),
            "good": save_model(root / "good", "llama", seed=1)}


def digest(directory):
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


CASES = [pytest.param(kind, build, sharded, fragment, command, id=f"{kind} | {command}")
         for kind, build, sharded, fragment, commands in CORPUS for command in commands]


@pytest.mark.parametrize("kind,build,sharded,fragment,command", CASES)
def test_bad_input_is_refused_cleanly(tmp_path, pristine, run_cli, kind, build, sharded, fragment, command):
    source = tmp_path / "src"
    shutil.copytree(pristine["sharded" if sharded else "single"], source)
    good = tmp_path / "good"
    shutil.copytree(pristine["good"], good)
    target = build(source) or source
    before = digest(source), digest(good)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(*COMMAND_ARGS[command](target, out, good))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {stderr[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("surgery: error: "), stderr
    assert "Traceback" not in stderr
    assert fragment in lines[0], lines[0]
    assert (digest(source), digest(good)) == before, "input files changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "src"], "output left behind"


def test_corpus_has_at_least_25_kinds():
    assert len(CORPUS) >= 25
