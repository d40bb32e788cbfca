"""Structure check (headers, config.json, index, NaN/Inf scan) and `surgery verify` with a manifest."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_model

from surgery.checks.structure import check_structure, scan_nonfinite
from surgery.io.checkpoint import Checkpoint
from surgery.verify import verify
from surgery.writer.manifest import MANIFEST_NAME


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("structure")
    return {"llama": save_model(root / "llama", "llama"),
            "sharded": save_model(root / "sharded", "mixtral", max_shard_size="20KB")}


@pytest.fixture
def llama(built, tmp_path):
    return shutil.copytree(built["llama"], tmp_path / "llama")


@pytest.fixture
def sharded(built, tmp_path):
    return shutil.copytree(built["sharded"], tmp_path / "sharded")


def rewrite(directory, change, file="model.safetensors"):
    tensors = load_file(directory / file)
    change(tensors)
    save_file(tensors, directory / file, metadata={"format": "pt"})


def write_manifest(directory):
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}
    (directory / MANIFEST_NAME).write_text(json.dumps({"files": files}))
    return files


def test_good_sharded_checkpoint_has_no_problems(sharded):
    report = check_structure(sharded)
    assert report["problems"] == [] and report["warnings"] == [] and report["scanned"]
    assert report["family"] == "mixtral" and len(report["shards"]) > 1


def test_nan_and_inf_are_counted_per_tensor(llama):
    def poison(tensors):
        tensors["model.layers.1.mlp.down_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), float("nan")])
    rewrite(llama, poison)
    report = check_structure(llama)
    assert report["nonfinite"] == {"model.layers.1.mlp.down_proj.weight": {"nan": 2, "inf": 1}}
    assert report["problems"] == ["model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' has 2 NaN and 1 Inf values"]
    assert check_structure(llama, scan=False)["problems"] == []


def test_scan_reads_large_tensors_in_row_blocks(llama):
    rewrite(llama, lambda t: t["model.embed_tokens.weight"][95].fill_(float("inf")))  # last row
    with Checkpoint.open(llama) as checkpoint:
        row_bytes = 32 * 4
        assert scan_nonfinite(checkpoint, block_bytes=7 * row_bytes) == {"model.embed_tokens.weight": {"nan": 0, "inf": 32}}


def test_renamed_tensor_is_missing_and_unexpected(llama):
    rewrite(llama, lambda t: t.__setitem__("model.layers.0.mlp.up.weight", t.pop("model.layers.0.mlp.up_proj.weight")))
    problems = check_structure(llama)["problems"]
    assert "missing tensor model.layers.0.mlp.up_proj.weight (expected shape [44, 32])" in problems
    assert any(p.startswith("unexpected tensor model.layers.0.mlp.up.weight") for p in problems)


def test_shape_disagreeing_with_config_is_a_problem(llama):
    config = json.loads((llama / "config.json").read_text())
    config["intermediate_size"] = 40
    (llama / "config.json").write_text(json.dumps(config))
    problems = check_structure(llama, scan=False)["problems"]
    assert "model.safetensors: tensor model.layers.1.mlp.down_proj.weight has shape [32, 44], config.json implies [32, 40]" in problems


def test_index_total_size_must_match_the_tensors(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    actual = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = actual + 4
    index_path.write_text(json.dumps(index))
    assert check_structure(sharded, scan=False)["problems"] == [
        f"model.safetensors.index.json: metadata.total_size is {actual + 4}, the tensors hold {actual} bytes"]


def test_stray_shard_beside_an_index_is_a_warning(sharded):
    save_file({"x": torch.zeros(2)}, sharded / "model-extra.safetensors")
    report = check_structure(sharded, scan=False)
    assert report["problems"] == []
    assert report["warnings"] == ["model-extra.safetensors is not listed in model.safetensors.index.json (transformers ignores it)"]


def test_verify_without_manifest_warns(llama):
    report = verify(llama)
    assert report["manifest"] is None and report["problems"] == []
    assert f"no {MANIFEST_NAME}: file hashes not checked" in report["warnings"]


def test_verify_checks_every_manifest_hash(sharded):
    files = write_manifest(sharded)
    report = verify(sharded)
    assert report["problems"] == [] and report["manifest"] == {"files_checked": len(files), "problems": 0}


def test_verify_names_a_modified_file(sharded, run_cli):
    write_manifest(sharded)
    shard = sorted(sharded.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    code, out, err = run_cli("verify", sharded)
    assert code == 2
    assert f"{shard.name}: sha256 {hashlib.sha256(bytes(data)).hexdigest()} differs from {MANIFEST_NAME}" in out + err


def test_verify_reports_missing_unlisted_and_outside_entries(sharded):
    files = write_manifest(sharded)
    listed = sorted(name for name in files if name.endswith(".safetensors"))
    files.pop(listed[0])
    files["gone.json"] = "0" * 64
    files["../escape"] = "0" * 64
    (sharded / MANIFEST_NAME).write_text(json.dumps({"files": files}))
    problems = verify(sharded, scan=False)["problems"]
    assert f"{listed[0]}: not listed in {MANIFEST_NAME}" in problems
    assert f"gone.json: listed in {MANIFEST_NAME} but missing" in problems
    assert any("'../escape' points outside" in p for p in problems)


def test_verify_cli_json_and_exit_codes(llama, run_cli):
    code, out, _ = run_cli("verify", llama, "--json")
    assert code == 0 and json.loads(out)["problems"] == []
    rewrite(llama, lambda t: t["model.norm.weight"].fill_(float("nan")))
    code, out, err = run_cli("verify", llama, "--json")
    assert code == 2 and "tensor 'model.norm.weight' has 32 NaN and 0 Inf" in err
    assert json.loads(out)["nonfinite"] == {"model.norm.weight": {"nan": 32, "inf": 0}}
