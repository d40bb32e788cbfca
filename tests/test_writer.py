"""The streaming writer's own behaviours: layout within a shard, read-ahead, the NaN/Inf check."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_model

from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint
from surgery.io.safetensors_format import read_header
from surgery.plan.nodes import Copy, Rows, Scale
from surgery.plan.plan import OutputTensor, Plan
from surgery.writer import stream as writer
from surgery.writer.deferred import Filled
from surgery.writer.manifest import MANIFEST_NAME
from surgery.writer.read_ahead import ReadAhead
from surgery.writer.shards import assign_shards


def _source(directory, tensors):
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    return Checkpoint.open(directory)


def _plan(checkpoint, tensors):
    return Plan("test", tensors, None, [checkpoint])


def test_byte_copies_come_before_computed_tensors_within_a_shard(tmp_path):
    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": torch.ones(4), "c": torch.ones(4)})
    plan = _plan(source, [OutputTensor("a", (4,), "F32", Scale(Copy(source, "a"), 2.0)),
                          OutputTensor("b", (4,), "F32", Copy(source, "b")),
                          OutputTensor("c", (4,), "F32", Copy(source, "c"))])
    writer.write_plan(plan, tmp_path / "out")
    header = read_header(tmp_path / "out" / "model.safetensors")
    by_offset = sorted(header.tensors, key=lambda name: header.tensors[name].offset)
    assert by_offset == ["b", "c", "a"]
    assert load_file(tmp_path / "out" / "model.safetensors")["a"].tolist() == [2.0] * 4


def test_shards_keep_plan_order_across_shards(tmp_path):
    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": torch.ones(4)})
    tensors = [OutputTensor("a", (4,), "F32", Scale(Copy(source, "a"), 2.0)),
               OutputTensor("b", (4,), "F32", Copy(source, "b"))]
    shards = assign_shards(tensors, max_shard_size=16)
    assert [[t.name for t in shard.tensors] for shard in shards] == [["a"], ["b"]]


def test_a_plain_copy_never_imports_torch(tmp_path):
    source = save_model(tmp_path / "src", "llama")
    code = ("import sys; from surgery.cli import main\n"
            f"try: main(['copy', {str(source)!r}, {str(tmp_path / 'out')!r}])\nexcept SystemExit as e: assert not e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_read_ahead_advises_the_inputs_of_the_next_tensors_up_to_the_budget(tmp_path, monkeypatch):
    names = ["t0", "t1", "t2", "t3"]
    source = _source(tmp_path / "src", {name: torch.ones(256) for name in names})  # 1 KiB each
    tensors = [OutputTensor(name, (256,), "F32", Copy(source, name)) for name in names]
    advised = []
    monkeypatch.setattr("surgery.writer.read_ahead.READ_AHEAD_BYTES", 2048)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append((offset, length)))
    read_ahead = ReadAhead(tensors)
    offsets = [source.info(name).offset for name in names]

    read_ahead.before(0)
    assert advised == [(offsets[0], 1024), (offsets[1], 1024)]  # this tensor and the next: 2 KiB
    read_ahead.before(1)
    assert advised[2:] == [(offsets[2], 1024)]
    read_ahead.before(3)
    assert advised[3:] == [(offsets[3], 1024)]
    read_ahead.before(3)
    assert len(advised) == 4  # nothing is advised twice


def test_read_ahead_can_be_turned_off(tmp_path, monkeypatch):
    source = _source(tmp_path / "src", {"a": torch.ones(4)})
    advised = []
    monkeypatch.setattr("surgery.writer.read_ahead.READ_AHEAD_BYTES", 0)
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: advised.append(args))
    ReadAhead([OutputTensor("a", (4,), "F32", Copy(source, "a"))]).before(0)
    assert advised == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_values_whose_sum_overflows_are_written(tmp_path, dtype):
    big = torch.finfo(dtype).max
    source = _source(tmp_path / "src", {"a": torch.full((8,), big, dtype=dtype)})
    plan = _plan(source, [OutputTensor("a", (8,), {torch.float32: "F32", torch.bfloat16: "BF16",
                                                   torch.float16: "F16"}[dtype], Scale(Copy(source, "a"), 1.0))])
    writer.write_plan(plan, tmp_path / "out")
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["a"], torch.full((8,), big, dtype=dtype))


def test_finite_float32_copy_whose_sum_overflows_is_written(tmp_path):
    big = float(np.finfo(np.float32).max)
    source = _source(tmp_path / "src", {"a": torch.full((8,), big)})
    writer.write_plan(_plan(source, [OutputTensor("a", (8,), "F32", Copy(source, "a"))]), tmp_path / "out")
    assert load_file(tmp_path / "out" / "model.safetensors")["a"].tolist() == [big] * 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_nonfinite_value_in_a_computed_tensor_is_refused(tmp_path, bad):
    values = torch.zeros(1000)
    values[517] = bad
    source = _source(tmp_path / "src", {"a": values})
    plan = _plan(source, [OutputTensor("a", (1000,), "F32", Scale(Copy(source, "a"), 1.0))])
    with pytest.raises(SurgeryError, match="1 NaN and 0 Inf" if bad != bad else "0 NaN and 1 Inf"):
        writer.write_plan(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_nonfinite_input_of_a_computed_tensor_is_named_with_its_file(tmp_path):
    values = torch.zeros(4, 8)
    values[3, 5] = float("nan")
    source = _source(tmp_path / "src", {"w": values})
    plan = _plan(source, [OutputTensor("expert", (2, 8), "F32", Rows(source, "w", [3, 1]))])
    with pytest.raises(SurgeryError) as raised:
        writer.write_plan(plan, tmp_path / "out")
    assert str(raised.value).startswith(f"{tmp_path / 'src' / 'model.safetensors'}: tensor 'w' has 1 NaN and 0 Inf")


def _two_sources(tmp_path, values_a, values_b):
    return [_source(tmp_path / name, {"w": value}) for name, value in (("a", values_a), ("b", values_b))]


def test_an_averaged_tensor_is_computed_in_blocks_of_rows_and_written_whole(tmp_path):
    from surgery.plan.mean import WeightedMean
    from surgery.plan.nodes import Copy

    sources = _two_sources(tmp_path, torch.arange(40.0).reshape(10, 4), torch.ones(10, 4))
    mean = WeightedMean([Copy(s, "w") for s in sources], [1.0, 3.0], block_bytes=3 * 4 * 4)  # 3 rows of 4 float32 per block
    assert [len(block) for block in mean.array_blocks("F32")] == [3, 3, 3, 1]
    writer.write_plan(_plan(sources[0], [OutputTensor("w", (10, 4), "F32", mean)]), tmp_path / "out")
    expected = torch.arange(40.0).reshape(10, 4) * 0.25 + 0.75
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"], expected)


def test_a_nonfinite_value_in_a_later_block_of_an_averaged_tensor_is_refused(tmp_path):
    from surgery.plan.mean import WeightedMean
    from surgery.plan.nodes import Copy

    values = torch.zeros(10, 4)
    values[8, 1] = float("inf")
    sources = _two_sources(tmp_path, values, torch.ones(10, 4))
    mean = WeightedMean([Copy(s, "w") for s in sources], [1.0, 1.0], block_bytes=3 * 4 * 4)
    with pytest.raises(SurgeryError, match=r"tensor 'w' has 0 NaN and 1 Inf"):
        writer.write_plan(_plan(sources[0], [OutputTensor("w", (10, 4), "F32", mean)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _deferred_plan(source):
    from surgery.plan.nodes import Deferred

    return _plan(source, [OutputTensor("r", (2, 2), "BF16", Deferred("fitted later")),
                          OutputTensor("a", (4,), "F32", Scale(Copy(source, "a"), 2.0)),
                          OutputTensor("b", (4,), "F32", Copy(source, "b"))])


def test_a_deferred_tensor_is_written_last_with_the_value_fill_gives_from_the_draft(tmp_path):
    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": torch.ones(4)})
    seen = {}

    def fill(draft, patch):
        seen["a"] = Checkpoint.open(draft).read("a").tolist()  # the draft is a readable checkpoint already
        return Filled({"r": torch.tensor([[1.5, -2.0], [0.25, 3.0]])}, {"NOTE.md": "fitted\n"})

    writer.write_plan(_deferred_plan(source), tmp_path / "out", fill=fill)
    header = read_header(tmp_path / "out" / "model.safetensors")
    assert sorted(header.tensors, key=lambda name: header.tensors[name].offset) == ["b", "a", "r"]
    assert seen["a"] == [2.0] * 4
    assert load_file(tmp_path / "out" / "model.safetensors")["r"].float().tolist() == [[1.5, -2.0], [0.25, 3.0]]
    assert (tmp_path / "out" / "NOTE.md").read_text() == "fitted\n"


def test_the_manifest_hashes_the_filled_shard(tmp_path):
    from surgery.writer.manifest import sha256_file

    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": torch.ones(4)})
    writer.write_plan(_deferred_plan(source), tmp_path / "out",
                      fill=lambda draft, patch: Filled({"r": torch.full((2, 2), 7.0)}))
    manifest = (tmp_path / "out" / MANIFEST_NAME).read_text()
    assert sha256_file(tmp_path / "out" / "model.safetensors") in manifest


def test_a_nonfinite_deferred_value_is_refused_and_leaves_no_output(tmp_path):
    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": torch.ones(4)})
    with pytest.raises(SurgeryError, match="output tensor 'r'.*1 NaN and 0 Inf"):
        writer.write_plan(_deferred_plan(source), tmp_path / "out",
                          fill=lambda draft, patch: Filled({"r": torch.tensor([[1.0, float("nan")], [0.0, 0.0]])}))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_a_failing_fill_leaves_no_output(tmp_path):
    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": torch.ones(4)})

    def fill(draft, patch):
        raise SurgeryError("the draft could not be run")

    with pytest.raises(SurgeryError, match="could not be run"):
        writer.write_plan(_deferred_plan(source), tmp_path / "out", fill=fill)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_a_fill_may_write_deferred_values_as_it_computes_them(tmp_path):
    from surgery.writer.manifest import sha256_file

    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": torch.ones(4)})

    def fill(draft, patch):
        patch("r", torch.full((2, 2), 3.0))  # written now, not returned
        return Filled({})

    writer.write_plan(_deferred_plan(source), tmp_path / "out", fill=fill)
    assert load_file(tmp_path / "out" / "model.safetensors")["r"].float().tolist() == [[3.0, 3.0], [3.0, 3.0]]
    assert sha256_file(tmp_path / "out" / "model.safetensors") in (tmp_path / "out" / MANIFEST_NAME).read_text()


@pytest.mark.parametrize("dtype,code", [(torch.float32, "F32"), (torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_a_nonfinite_value_in_a_kernel_copied_tensor_is_found_where_it_is_hashed(tmp_path, monkeypatch, dtype, code):
    """Byte copies are kernel copies whose NaN/Inf check runs on the bytes the hasher reads back. With 8-byte hash
    reads and a 6-byte tensor first, the copied tensor starts mid-read; its last element is the bad one."""
    monkeypatch.setattr("surgery.writer.hashing.COPY_CHUNK", 8)
    values = torch.zeros(37, dtype=dtype)
    values[-1] = float("nan")
    source = _source(tmp_path / "src", {"a": torch.ones(3, dtype=torch.bfloat16), "w": values})
    plan = _plan(source, [OutputTensor("a", (3,), "BF16", Copy(source, "a")), OutputTensor("w", (37,), code,
                                                                                         Copy(source, "w"))])
    with pytest.raises(SurgeryError) as raised:
        writer.write_plan(plan, tmp_path / "out")
    assert str(raised.value).startswith(f"{tmp_path / 'src' / 'model.safetensors'}: tensor 'w' has 1 NaN and 0 Inf")
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_finite_kernel_copies_checked_in_small_hash_reads_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr("surgery.writer.hashing.COPY_CHUNK", 8)
    tensors = {"a": torch.ones(3, dtype=torch.bfloat16), "w": torch.arange(37, dtype=torch.float32),
               "h": torch.full((5,), 65504.0, dtype=torch.float16)}
    source = _source(tmp_path / "src", tensors)
    plan = _plan(source, [OutputTensor(name, tuple(t.shape), {torch.bfloat16: "BF16", torch.float32: "F32",
                                                              torch.float16: "F16"}[t.dtype], Copy(source, name))
                          for name, t in tensors.items()])
    writer.write_plan(plan, tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(written[name], t) for name, t in tensors.items())


def test_a_nonfinite_copied_input_of_a_draft_is_refused_before_the_fill_runs(tmp_path):
    values = torch.ones(4)
    values[2] = float("inf")
    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": values})
    ran = []
    with pytest.raises(SurgeryError, match="tensor 'b' has 0 NaN and 1 Inf"):
        writer.write_plan(_deferred_plan(source), tmp_path / "out",
                          fill=lambda draft, patch: ran.append(1) or Filled({"r": torch.zeros(2, 2)}))
    assert ran == []
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_a_fill_may_write_a_deferred_tensor_in_blocks_of_rows(tmp_path):
    from surgery.writer.manifest import sha256_file

    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": torch.ones(4)})

    def fill(draft, patch):
        patch("r", torch.tensor([[5.0, 6.0]]), start_row=1)  # any order; every row once
        patch("r", torch.tensor([[1.0, 2.0]]), start_row=0)
        return Filled({})

    writer.write_plan(_deferred_plan(source), tmp_path / "out", fill=fill)
    assert load_file(tmp_path / "out" / "model.safetensors")["r"].float().tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert sha256_file(tmp_path / "out" / "model.safetensors") in (tmp_path / "out" / MANIFEST_NAME).read_text()


def test_a_deferred_tensor_missing_rows_is_not_complete(tmp_path):
    source = _source(tmp_path / "src", {"a": torch.ones(4), "b": torch.ones(4)})

    def fill(draft, patch):
        patch("r", torch.tensor([[1.0, 2.0]]), start_row=0)
        return Filled({})

    with pytest.raises(AssertionError, match="no value for deferred tensor r"):
        writer.write_plan(_deferred_plan(source), tmp_path / "out", fill=fill)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]
