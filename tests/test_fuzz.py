"""Fuzzing: mutated safetensors headers and index files make every command either succeed or fail
with SurgeryError, never another exception, within a bounded time and memory.

CI runs a few hundred examples; set SURGERY_FUZZ_EXAMPLES to run more locally.
"""

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import save_model

from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint

EXAMPLES = int(os.environ.get("SURGERY_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**66, 2**66) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-seeds")
    return {"single": save_model(root / "single", "llama"),
            "sharded": save_model(root / "sharded", "llama", max_shard_size="20KB")}


SECONDS_PER_EXAMPLE = 60  # bounds, far above what a tiny model needs (~0.1-1 s): a hang or
MEMORY_PER_EXAMPLE = 64 * 2**20  # an allocation sized by a corrupt header fails the example


def run_every_command(directory: Path) -> None:
    """Every command on `directory`: inspect --stats, copy, and upcycle / split / merge / validate
    (plans, dry runs and structure checks). Each must succeed or refuse with SurgeryError (exit 2)
    within the time and memory bounds; any other exception fails the example."""
    import time
    import tracemalloc

    started = time.monotonic()
    tracemalloc.start()
    try:
        _every_command(directory)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < SECONDS_PER_EXAMPLE, "too slow"
    assert peak < MEMORY_PER_EXAMPLE, f"allocated {peak / 2**20:.0f} MiB at peak"


def _every_command(directory: Path) -> None:
    from surgery.inspect import analyse
    from surgery.plan.identity import build_plan
    from surgery.upcycle import build_plan as upcycle_plan
    from surgery.writer.stream import write_plan

    try:
        with Checkpoint.open(directory) as checkpoint:
            analyse(checkpoint, with_tensors=True, with_stats=True)
            write_plan(build_plan(checkpoint), directory.parent / "out", allow_nonfinite=True)
    except SurgeryError:
        pass
    try:
        upcycle_plan(directory, num_experts=4, top_k=2)
    except SurgeryError:
        pass
    out = directory.parent / "out-dry"
    _cli("split", directory, out, "-n", 2, "-k", 2, "--strategy", "random", "--dry-run")
    _cli("merge", out, "--expert", f"a={directory}", "--expert", f"b={directory}", "--dry-run")
    _cli("validate", directory, "--structure-only")


def _cli(*args) -> None:
    """Run a command in-process: exit 0 or 2 (SurgeryError); anything else propagates and fails."""
    import contextlib
    import io

    from surgery.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            main([str(arg) for arg in args])
        except SystemExit as exit:
            assert exit.code in (0, 2, None), f"{args[0]}: exit {exit.code}: {err.getvalue()[-500:]}"


def _header(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw, length


@FUZZ
@given(data=st.data())
def test_mutated_header_bytes(seeds, data):
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp) / "model"
        shutil.copytree(seeds["single"], directory)
        path = directory / "model.safetensors"
        raw, length = _header(path)
        raw = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 6))):
            position = data.draw(st.integers(0, 8 + length - 1))
            raw[position] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(raw))
        run_every_command(directory)


@FUZZ
@given(data=st.data())
def test_mutated_header_fields(seeds, data):
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp) / "model"
        shutil.copytree(seeds["single"], directory)
        path = directory / "model.safetensors"
        raw, length = _header(path)
        header = json.loads(raw[8:8 + length])
        name = data.draw(st.sampled_from(sorted(header)))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        if isinstance(header[name], dict) and data.draw(st.booleans()):
            value = header[name].get(field)
            if isinstance(value, list) and value:  # nudge one number: the realistic corruption
                index = data.draw(st.integers(0, len(value) - 1))
                value[index] = data.draw(st.integers(-2, 2**40)) if data.draw(st.booleans()) else value[index] + data.draw(st.integers(-64, 64))
            else:
                header[name][field] = data.draw(JSON_VALUES)
        else:
            header[name] = data.draw(JSON_VALUES)
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])
        run_every_command(directory)


@FUZZ
@given(data=st.data())
def test_mutated_index(seeds, data):
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp) / "model"
        shutil.copytree(seeds["sharded"], directory)
        path = directory / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        choice = data.draw(st.sampled_from(["value", "key", "drop", "weight_map", "whole", "bytes"]))
        names = sorted(index["weight_map"])
        if choice == "value":
            index["weight_map"][data.draw(st.sampled_from(names))] = data.draw(
                st.sampled_from(sorted(set(index["weight_map"].values())) + ["../x", "/etc/hostname", ""]) | st.text(max_size=20) | JSON_VALUES)
        elif choice == "key":
            index["weight_map"][data.draw(st.text(max_size=20))] = data.draw(st.sampled_from(sorted(set(index["weight_map"].values()))))
        elif choice == "drop":
            del index["weight_map"][data.draw(st.sampled_from(names))]
        elif choice == "weight_map":
            index["weight_map"] = data.draw(JSON_VALUES)
        else:
            index = data.draw(JSON_VALUES)
        text = json.dumps(index)
        if choice == "bytes":
            text = text[: data.draw(st.integers(0, len(text)))]
        path.write_text(text)
        run_every_command(directory)
