"""`surgery copy`: the identity plan through the streaming writer."""

import hashlib
import json

import pytest
import torch
from tiny_models import CONFIGS, load_model, logits, sample_ids, save_model

from surgery.io.checkpoint import Checkpoint


def tensors_of(directory):
    checkpoint = Checkpoint.open(directory)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copy_round_trips_bit_exactly_and_loads(tmp_path, run_cli, family, dtype):
    source = save_model(tmp_path / "src", family, dtype=dtype, max_shard_size="30KB")
    code, _, err = run_cli("copy", source, tmp_path / "out", "--max-shard-size", "10KB")
    assert code == 0, err
    before, after = tensors_of(source), tensors_of(tmp_path / "out")
    assert before.keys() == after.keys()
    assert all(before[n].dtype == after[n].dtype and torch.equal(before[n], after[n]) for n in before)
    ids = sample_ids()
    assert torch.equal(logits(load_model(source), ids), logits(load_model(tmp_path / "out"), ids))


def test_copy_to_one_file_writes_no_index(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama", max_shard_size="20KB")
    assert run_cli("copy", source, tmp_path / "out")[0] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "surgery-manifest.json"]


def test_index_lists_every_tensor_and_the_total_size(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    assert run_cli("copy", source, tmp_path / "out", "--max-shard-size", "20KB")[0] == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(Checkpoint.open(source).tensors)
    assert index["metadata"]["total_size"] == Checkpoint.open(source).total_bytes
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(p.stat().st_size <= 20_000 + 4096 for p in shards)


def test_cast_to_bf16_changes_only_float_tensors_and_config(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    assert run_cli("copy", source, tmp_path / "out", "--dtype", "bf16")[0] == 0
    before, after = tensors_of(source), tensors_of(tmp_path / "out")
    assert all(after[n].dtype == torch.bfloat16 and torch.equal(after[n], before[n].to(torch.bfloat16)) for n in before)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_same_input_gives_byte_identical_output(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "qwen2")
    for out in ("a", "b"):
        assert run_cli("copy", source, tmp_path / out, "--max-shard-size", "20KB")[0] == 0
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / d).iterdir())}
    assert digest("a") == digest("b")


def test_existing_output_is_refused_and_kept(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run_cli("copy", source, tmp_path / "out")
    assert code == 2 and "output already exists (use --force" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_force_replaces_the_output(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    assert run_cli("copy", source, tmp_path / "out", "--force")[0] == 0
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_output_inside_input_is_refused(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    code, _, err = run_cli("copy", source, source / "nested")
    assert code == 2 and "output is inside the input" in err and not (source / "nested").exists()


def test_dry_run_writes_nothing_and_lists_recipes(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    code, out, _ = run_cli("copy", source, tmp_path / "out", "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and not (tmp_path / "out").exists()
    assert {t["name"] for t in plan["tensors"]} == set(Checkpoint.open(source).tensors)
    assert plan["tensors"][0]["recipe"].startswith("copy ")


def test_provenance_is_in_the_shard_metadata(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    assert run_cli("copy", source, tmp_path / "out")[0] == 0
    metadata = Checkpoint.open(tmp_path / "out").metadata[tmp_path / "out" / "model.safetensors"]
    assert metadata["format"] == "pt" and metadata["surgery_operation"] == "copy"
    assert json.loads(metadata["surgery_sources"]) == [str(source)]


def test_no_temporary_directory_is_left_behind(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    assert run_cli("copy", source, tmp_path / "out")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_manifest_records_the_sha256_of_every_file(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    assert run_cli("copy", source, tmp_path / "out", "--max-shard-size", "20KB")[0] == 0
    manifest = json.loads((tmp_path / "out" / "surgery-manifest.json").read_text())
    files = sorted(p for p in (tmp_path / "out").iterdir() if p.name != "surgery-manifest.json")
    assert manifest["files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_nonfinite_source_is_refused_unless_allowed(tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    source = save_model(tmp_path / "src", "llama")
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("copy", source, tmp_path / "out")
    assert code == 2 and "tensor 'model.layers.1.mlp.down_proj.weight' has 1 NaN and 0 Inf values" in err
    assert not (tmp_path / "out").exists()
    assert run_cli("copy", source, tmp_path / "out", "--allow-nonfinite")[0] == 0
