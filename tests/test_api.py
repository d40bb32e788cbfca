"""The Python API: `surgery.upcycle(...)` and friends run the commands' code, return results, print nothing."""

import inspect
import subprocess
import sys

import pytest
import torch
from tiny_models import load_model, logits, sample_ids, save_model

import surgery
from surgery.errors import SurgeryError


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("api") / "dense", "llama")


def test_upcycle_returns_a_result_and_the_output_reproduces_the_source(tmp_path, dense, capfd):
    result = surgery.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, router_init="zero")
    assert capfd.readouterr() == ("", "")  # the API prints nothing
    assert isinstance(result, surgery.Result)
    assert (result.operation, result.out, result.written, result.shards) == ("upcycle", tmp_path / "moe", True, 1)
    assert result.config["num_local_experts"] == 4 and result.config["num_experts_per_tok"] == 2
    ids = sample_ids(load_model(dense).config.vocab_size)
    assert torch.allclose(logits(load_model(tmp_path / "moe"), ids), logits(load_model(dense), ids), atol=1e-5)


def test_verify_returns_the_layer_by_layer_comparison(tmp_path, dense):
    result = surgery.upcycle(dense, tmp_path / "moe", 4, 2, verify=True)
    assert result.verification["passed"] is True
    assert len(result.verification["layers"]) == load_model(dense).config.num_hidden_layers


def test_dry_run_writes_nothing_and_returns_the_plan(tmp_path, dense):
    result = surgery.split(dense, tmp_path / "moe", 4, 4, strategy="random", dry_run=True)
    assert result.written is False and not (tmp_path / "moe").exists()
    assert result.tensors == len(result.plan.tensors) and result.total_bytes == result.plan.total_bytes


def test_bad_input_raises_surgery_error_and_prints_nothing(tmp_path, dense, capfd):
    with pytest.raises(SurgeryError, match="--top-k 5"):
        surgery.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=5)
    assert capfd.readouterr() == ("", "")
    assert not (tmp_path / "moe").exists()


def test_an_unknown_keyword_is_a_type_error(tmp_path, dense):
    with pytest.raises(TypeError, match="num_expert"):
        surgery.upcycle(dense, tmp_path / "moe", 4, 2, num_expert=3)


def test_split_and_copy_and_merge_write_what_their_commands_write(tmp_path, dense, run_cli):
    surgery.split(dense, tmp_path / "api-split", 4, 2, strategy="random", router_init="zero", seed=3)
    assert run_cli("split", dense, tmp_path / "cli-split", "-n", "4", "-k", "2", "--strategy", "random",
                   "--router-init", "zero", "--seed", "3")[0] == 0
    api, cli = _tensors(tmp_path / "api-split"), _tensors(tmp_path / "cli-split")
    assert api.keys() == cli.keys() and all(torch.equal(api[name], cli[name]) for name in api)
    surgery.copy(dense, tmp_path / "copy", dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in _tensors(tmp_path / "copy").values())
    other = save_model(tmp_path / "other", "llama", seed=1)
    result = surgery.merge(tmp_path / "merged", experts={"a": dense, "b": other}, router_init="zero")
    assert result.config["num_local_experts"] == 2


def test_inspect_returns_the_report(tmp_path, dense):
    surgery.upcycle(dense, tmp_path / "moe", 4, 2)
    report = surgery.inspect(tmp_path / "moe")
    assert (report.family, report.kind, report.expert_layout, report.problems) == ("mixtral", "moe", "per_expert", [])


def test_validate_returns_the_report_with_each_reference(tmp_path, dense):
    surgery.upcycle(dense, tmp_path / "moe", 4, 2, router_init="zero")
    report = surgery.validate(tmp_path / "moe", references=[dense], max_tokens=64)
    assert report["loss"] == pytest.approx(report["references"][0]["loss"], abs=1e-5)


def test_the_signature_names_every_option_of_the_command():
    from surgery.upcycle import command

    names = set(inspect.signature(surgery.upcycle).parameters)
    flags = {param.opts[0].lstrip("-").replace("-", "_") for param in command.params if param.opts[0] != "--json"}
    assert flags <= names


def test_import_surgery_imports_no_torch():
    code = "import sys, surgery; surgery.upcycle; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _tensors(directory):
    from safetensors.torch import load_file

    return {name: value for path in sorted(directory.glob("*.safetensors")) for name, value in load_file(path).items()}
