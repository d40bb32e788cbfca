"""A directory that holds only config.json: `surgery inspect` and the --dry-run of prune, upcycle and copy size the
model from the family table; a command that needs the weights refuses it in one line. The flagship configs in
tests/data/flagship/ are sized within 1 % of their published totals (bench/flagship_sizes.py prints the table)."""

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import CONFIGS, save_model

import surgery

FLAGSHIPS = Path(__file__).parent / "data" / "flagship"
PUBLISHED = json.loads((FLAGSHIPS / "published.json").read_text())["models"]
OURS = {"with embedding": "active_parameters", "without input embedding": "active_parameters_without_embedding"}


def config_only(directory: Path, source: Path) -> Path:
    directory.mkdir(parents=True)
    shutil.copy(source / "config.json" if source.is_dir() else source, directory / "config.json")
    return directory


def inspect_json(run_cli, directory):
    code, out, err = run_cli("inspect", directory, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def deepseek(tmp_path):
    """(a tiny DeepSeek-V3 checkpoint with its MTP layer, a directory with only its config.json)"""
    real = save_model(tmp_path / "real", "deepseek_v3")
    return real, config_only(tmp_path / "config-only", real)


def test_inspect_of_a_config_only_directory_says_so(deepseek, run_cli):
    code, out, err = run_cli("inspect", deepseek[1])
    assert code == 0, err
    assert "config only: sizes from config.json, no weights" in out
    assert "MTP layers  " in out and "not sized" in out and "no problems found" not in out
    report = inspect_json(run_cli, deepseek[1])
    assert report["config_only"] is True and report["shards"] == [] and report["bytes_on_disk"] == 0


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "ernie4_5_moe", "phi3", "qwen2_moe"]
                         + [family for family in ("qwen3_next", "llama4") if family in CONFIGS])
def test_config_only_counts_equal_the_checkpoints(tmp_path, run_cli, family):
    """Total, active and active without the embedding from config.json alone equal inspect's of the checkpoint
    (fused-only experts, tied embeddings, fused qkv, shared experts, hybrid layers); MTP layers are counted apart."""
    real = inspect_json(run_cli, save_model(tmp_path / "real", family))
    sized = inspect_json(run_cli, config_only(tmp_path / "config-only", tmp_path / "real"))
    for key in ("parameters", "active_parameters", "active_parameters_without_embedding", "weight_bytes",
                "summary", "moe", "layer_kinds", "mtp_layers"):
        if key == "weight_bytes" and real["mtp_parameters"]:
            assert sized[key] == real[key] - 4 * real["mtp_parameters"]
        else:
            assert sized[key] == real[key], key
    assert sized["mtp_parameters"] is None and real["config_only"] is False


def test_mtp_layers_are_counted_apart(deepseek, run_cli):
    real, sized = (inspect_json(run_cli, directory) for directory in deepseek)
    assert real["mtp_parameters"] > 0 and real["mtp_layers"] == sized["mtp_layers"] == 1
    assert real["parameters"] == sized["parameters"]  # the MTP layer is in neither


def test_bytes_are_counted_in_the_configs_dtype(tmp_path, run_cli):
    directory = config_only(tmp_path / "v3", FLAGSHIPS / "deepseek-v3.json")
    report = inspect_json(run_cli, directory)
    assert report["weight_bytes"] == 2 * report["parameters"] and set(report["dtypes"]) == {"BF16"}
    assert any("quantization_config (fp8)" in note for note in report["notes"])


def test_attention_kinds_of_each_layer_are_reported(tmp_path, run_cli):
    directory = config_only(tmp_path / "oss", FLAGSHIPS / "gpt-oss-120b.json")
    kinds = inspect_json(run_cli, directory)["layer_kinds"]
    assert [kind["attention"] for kind in kinds[:2]] == ["sliding_attention", "full_attention"] and len(kinds) == 36
    assert {kind["ffn"] for kind in kinds} == {"moe"}
    code, out, _ = run_cli("inspect", directory)
    assert "sliding × 18: 0, 2, ..., 34; full × 18: 1, 3, ..., 35" in out


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_flagship_total_is_within_1_percent_of_the_published(tmp_path, name):
    entry = PUBLISHED[name]
    report = surgery.inspect(config_only(tmp_path / name, FLAGSHIPS / f"{name}.json"))
    tolerance = entry.get("total_tolerance", 0.01)  # wider only where total_note explains why
    towers = report.nested["carried_parameters"] if entry.get("total_includes_towers") else 0
    assert report.config_only and abs((report.parameters + towers) / 1e9 / entry["total_b"] - 1) <= tolerance


@pytest.mark.parametrize("name", [name for name, entry in PUBLISHED.items() if entry["active_definition"] in OURS])
def test_flagship_active_is_within_5_percent_where_the_definition_is_ours(tmp_path, name):
    entry = PUBLISHED[name]
    report = surgery.inspect(config_only(tmp_path / name, FLAGSHIPS / f"{name}.json")).to_json()
    assert abs(report[OURS[entry["active_definition"]]] / 1e9 / entry["active_b"] - 1) <= 0.05


def test_flagship_configs_are_plain_configs():
    """Each flagship file is a config.json as published: no published figures inside it."""
    for path in FLAGSHIPS.glob("*.json"):
        if path.name != "published.json":
            config = json.loads(path.read_text())
            assert not any(key.startswith("_") for key in config) and config["architectures"], path.name
            assert path.stem in PUBLISHED, path.name


@pytest.mark.parametrize("command", [("validate",), ("prune", "--keep", "4", "--criterion", "random"),
                                     ("copy",), ("extract", "--expert", "0"), ("inspect", "--stats")])
def test_a_command_that_needs_the_weights_refuses_in_one_line(deepseek, run_cli, tmp_path, command):
    out = tmp_path / "out"
    args = [command[0], deepseek[1]] + ([out] if command[0] not in ("validate", "inspect") else []) + list(command[1:])
    code, _, err = run_cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds only config.json, no weights" in err and "safetensors" in err and "Traceback" not in err
    assert not out.exists()


def test_prune_dry_run_plans_from_config_json_alone(deepseek, run_cli, tmp_path):
    """The plan (every tensor, shape, dtype and recipe) is the one the checkpoint's dry run prints."""
    plans = []
    for source in deepseek:
        code, out, err = run_cli("prune", source, tmp_path / "out", "--keep", "4", "--criterion", "random",
                                 "--dry-run", "--json")
        assert code == 0, err
        plans.append(json.loads(out))
        notes = err
    real, sized = plans
    assert sized["config_only"] is True and real["config_only"] is False
    for key in ("tensors", "parameters", "total_bytes", "active_parameters", "active_parameters_without_embedding"):
        assert sized[key] == real[key], key
    # the checkpoint's stored MTP layer is left out (num_nextn_predict_layers: 0); config.json alone cannot say it is
    # stored, and the dry run says so
    assert {**sized["config"], "num_nextn_predict_layers": 0} == real["config"]
    assert "without the 1 multi-token-prediction layer it declares" in notes
    assert sized["active_parameters"] < sized["parameters"] and not (tmp_path / "out").exists()


def test_prune_with_a_calibrated_criterion_is_refused_config_only(deepseek, run_cli, tmp_path):
    code, _, err = run_cli("prune", deepseek[1], tmp_path / "out", "--keep", "4", "--dry-run")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--criterion reap runs the model on calibration text" in err and "--criterion random or --scores" in err


@pytest.mark.parametrize("command", [("upcycle", "-n", "4", "-k", "2"), ("copy",)])
def test_upcycle_and_copy_dry_runs_plan_from_config_json_alone(tmp_path, run_cli, command):
    real = save_model(tmp_path / "real", "llama")
    plans = []
    for source in (real, config_only(tmp_path / "config-only", real)):
        code, out, err = run_cli(command[0], source, tmp_path / "out", *command[1:], "--dry-run", "--json")
        assert code == 0, err
        plans.append(json.loads(out))
    real, sized = ({t["name"]: t for t in plan["tensors"]} for plan in plans)  # copy keeps the stored order
    assert plans[1]["config_only"] and real == sized
    assert plans[0]["parameters"] == plans[1]["parameters"] and not (tmp_path / "out").exists()
