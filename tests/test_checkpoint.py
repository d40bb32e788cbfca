"""Opening checkpoints: single file, directory, shards + index; lazy reads; index consistency."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import save_model

from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint


@pytest.fixture
def sharded(tmp_path):
    return save_model(tmp_path / "sharded", "llama", max_shard_size="20KB")


def test_single_file_directory_and_index_open_the_same_tensors(tmp_path, sharded):
    single = save_model(tmp_path / "single", "llama")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    by_dir, by_index = Checkpoint.open(single), Checkpoint.open(sharded)
    by_file = Checkpoint.open(single / "model.safetensors")
    assert set(by_dir.tensors) == set(by_index.tensors) == set(by_file.tensors)
    for name in by_dir.tensors:
        assert torch.equal(by_dir.read(name), by_index.read(name))


def test_read_rows_reads_the_requested_rows_in_order(tmp_path):
    tensor = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    save_file({"w": tensor}, tmp_path / "model.safetensors")
    checkpoint = Checkpoint.open(tmp_path)
    assert torch.equal(checkpoint.read_rows("w", [7, 2, 3, 4, 0]), tensor[[7, 2, 3, 4, 0]])


def test_bf16_tensors_read_exactly(tmp_path):
    tensor = torch.randn(5, 3).to(torch.bfloat16)
    save_file({"w": tensor}, tmp_path / "model.safetensors")
    assert torch.equal(Checkpoint.open(tmp_path).read("w"), tensor)


def test_missing_shard_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(SurgeryError, match=f"shard '{shard.name}' .* is missing"):
        Checkpoint.open(sharded)


def test_tensor_listed_but_absent_is_named(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match="tensor 'model.layers.9.mlp.up_proj.weight' is listed in .* but absent"):
        Checkpoint.open(sharded)


def test_tensor_present_but_unlisted_is_named(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match="tensor 'model.norm.weight' is in the shard but not in model.safetensors.index.json"):
        Checkpoint.open(sharded)


@pytest.mark.parametrize("shard", ["", "model\x00.safetensors"])
def test_shard_name_that_is_not_a_file_name_is_refused(sharded, shard):
    """Found by the fuzzer: a NUL byte in a shard name made pathlib raise ValueError."""
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match="tensor 'model.norm.weight' points to shard .* not a valid file name"):
        Checkpoint.open(sharded)


def test_same_tensor_in_two_shards_is_refused(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(SurgeryError, match="tensor 'a' is stored in two shards"):
        Checkpoint.open(tmp_path)


def test_shard_path_outside_the_directory_is_refused(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match="outside the checkpoint directory"):
        Checkpoint.open(sharded)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(SurgeryError, match="pickle checkpoints are refused"):
        Checkpoint.open(tmp_path)


def test_truncated_file_is_named(tmp_path):
    save_file({"w": torch.zeros(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-40])
    with pytest.raises(SurgeryError, match="model.safetensors: tensor 'w': data_offsets end 400 is beyond the data section"):
        Checkpoint.open(tmp_path)


def test_config_is_required_for_operations(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert Checkpoint.open(tmp_path).config is None
    with pytest.raises(SurgeryError, match=r"config.json: no such file"):
        Checkpoint.open(tmp_path, require_config=True)


def test_side_files_are_small_non_weight_files(tmp_path):
    directory = save_model(tmp_path / "m", "llama")
    (directory / "tokenizer.json").write_text("{}")
    (directory / "pytorch_model.bin").write_bytes(b"x")
    names = [p.name for p in Checkpoint.open(directory).side_files()]
    assert names == ["generation_config.json", "tokenizer.json"]
