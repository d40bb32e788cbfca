"""mergekit-moe configs in the shapes users publish (tests/mergekit_configs/), run end to end on tiny models.

Accepted configs write a model that transformers loads with no key problem, in the format the config
names; refused ones exit 2 with one line that names the key, before anything is written. Where mergekit-moe
0.1.5 (its own virtualenv, /tmp/mk) also writes a model transformers runs natively, every expert FFN is
bit-identical to mergekit-moe's and in the same order; without that virtualenv the comparison is skipped.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_merge import save_member
from tiny_models import load_model

from surgery.io.checkpoint import Checkpoint

CORPUS = Path(__file__).parent / "mergekit_configs"
MERGEKIT = Path("/tmp/mk/bin/mergekit-moe")
MODELS = {"base": ("llama", 0), "a": ("llama", 1), "b": ("llama", 2), "c": ("llama", 3),
          "qbase": ("qwen2", 0), "qa": ("qwen2", 1), "qb": ("qwen2", 2),
          "q3base": ("qwen3", 0), "q3a": ("qwen3", 1), "q3b": ("qwen3", 2),
          "mbase": ("mistral", 0), "ma": ("mistral", 1)}

# config -> the format it is written in
ACCEPTED = {
    "docs_template": "mixtral", "docs_sparse_upcycling": "mixtral", "docs_clown_car": "mixtral",
    "docs_shared_expert": "qwen2_moe", "shared_expert_llama_hidden": "qwen2_moe", "shared_expert_random": "qwen2_moe",
    "shared_expert_no_architecture": "qwen2_moe", "clown_car_top1_fp16": "mixtral", "top3_four_experts": "mixtral",
    "noise_scale_upcycle": "mixtral", "yaml_anchors": "mixtral", "prompts_as_string": "mixtral",
    "negative_prompts": "mixtral", "residual_scale_routed": "mixtral", "tokenizer_source_union": "mixtral",
    "tokenizer_mapping": "mixtral", "qwen3_architecture": "qwen3_moe", "qwen_names_qwen3": "qwen3_moe",
    "mistral_clown_car": "mixtral",
}
# config -> what its one-line refusal begins with, after the file name (the key it names first)
REFUSED = {
    "refused_deepseek": "architecture 'deepseek' (deepseek moe) is not supported: mergekit's DeepSeek MoE output "
                        "loads only with trust_remote_code",
    "refused_hub_id": "base_model: no directory",
    "refused_lora": "experts[0].source_model: 'models/a+adapters/code-lora' applies a LoRA adapter",
    "refused_two_shared_experts": "shared_experts lists 2 models; one shared expert at most",
    "refused_shared_expert_mixtral": "shared_experts needs a format with a shared expert, but mixtral has none",
    "refused_tokenizer_tokens": "tokenizer.tokens is not supported",
    "refused_other_tokenizer": "/models/other_tokenizer: its tokenizer.json differs from seed's (compared by content)",
    "refused_merge_method": "(mergekit-moe config): unknown key 'merge_method'",
}
# accepted by both tools, each writing a format transformers runs: expert FFNs compared bit for bit
COMPARED = sorted(set(ACCEPTED) - {"noise_scale_upcycle", "prompts_as_string", "shared_expert_no_architecture"})
# what mergekit-moe 0.1.5 does with the accepted configs left out of COMPARED
MERGEKIT_OTHERWISE = {
    "noise_scale_upcycle": "ok",  # unseeded noise: compared by its statistics instead
    "prompts_as_string": "ValidationError",  # positive_prompts must be a list
    "shared_expert_no_architecture": "AttributeError",  # picks DeepSeek MoE, then reads the shared model unloaded
}


def configs() -> list[str]:
    return sorted(path.stem for path in CORPUS.glob("*.yml"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus beside the tiny models its paths name (models/NAME), plus a model with another tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    for name, (family, seed) in MODELS.items():
        save_member(root / "models" / name, family, seed=seed)
    other = shutil.copytree(root / "models" / "a", root / "models" / "other_tokenizer")
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"x"', '"X"', 1))
    for path in CORPUS.glob("*.yml"):
        shutil.copy(path, root / path.name)
    for outputs in ("ours", "refused", "mergekit"):
        (root / outputs).mkdir()
    return root


def ours(corpus, name: str) -> Path:
    """Our output of config `name` (written once per module)."""
    from surgery.cli import main

    out = corpus / "ours" / name
    if not out.exists():
        with pytest.raises(SystemExit) as done:
            main(["merge", str(out), "--config", str(corpus / f"{name}.yml")])
        assert done.value.code in (0, None)
    return out


@pytest.fixture(scope="module")
def mergekit(corpus):
    """{config: 'ok' or mergekit-moe's error}, every config run once by mergekit-moe 0.1.5 in its own virtualenv."""
    if not MERGEKIT.exists():
        pytest.skip(f"mergekit-moe is not installed at {MERGEKIT} (its own virtualenv): no comparison")
    pairs = [str(arg) for name in configs() for arg in (corpus / f"{name}.yml", corpus / "mergekit" / name)]
    driver = Path(__file__).parent / "mergekit_driver.py"
    subprocess.run([str(MERGEKIT.parent / "python"), str(driver), str(corpus / "mergekit.json"), *pairs],
                   check=True, capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    results = json.loads((corpus / "mergekit.json").read_text())
    return {Path(config).stem: result for config, result in results.items()}


def test_every_config_in_the_corpus_has_an_expectation():
    assert sorted([*ACCEPTED, *REFUSED]) == configs()


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_config_writes_a_model_that_loads_with_no_key_problem(corpus, name, run_cli):
    code, _, err = run_cli("merge", corpus / "ours" / name, "--config", corpus / f"{name}.yml")
    assert code == 0, err
    config = json.loads((corpus / "ours" / name / "config.json").read_text())
    assert config["model_type"] == ACCEPTED[name]
    load_model(corpus / "ours" / name)  # fails on any missing, unexpected or mismatched key


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_config_gives_one_line_naming_the_key(corpus, name, run_cli):
    code, _, err = run_cli("merge", corpus / "refused" / name, "--config", corpus / f"{name}.yml")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"surgery: error: {corpus / name}.yml") and REFUSED[name] in lines[0], lines[0]
    assert not (corpus / "refused" / name).exists()


# ------------------------------------------------------------------ against mergekit-moe
def expert_parameters(model) -> dict:
    """Every routed and shared expert FFN parameter of a loaded MoE (in transformers' in-memory layout)."""
    return {name: value for name, value in model.state_dict().items()
            if ".experts." in name or ".shared_expert." in name}


def test_mergekit_moe_gives_the_expected_result_on_the_rest_of_the_corpus(mergekit):
    assert {name: mergekit[name] for name in COMPARED} == dict.fromkeys(COMPARED, "ok")
    assert {name: mergekit[name].split(":")[0] for name in MERGEKIT_OTHERWISE} == MERGEKIT_OTHERWISE


@pytest.mark.parametrize("name", COMPARED)
def test_expert_ffns_are_bit_identical_to_mergekit_moes_and_in_the_same_order(corpus, mergekit, name):
    if mergekit[name] != "ok":
        pytest.fail(f"mergekit-moe: {mergekit[name]}")
    out = ours(corpus, name)
    mine, theirs = load_model(out), load_model(corpus / "mergekit" / name)
    mine_experts, their_experts = expert_parameters(mine), expert_parameters(theirs)
    assert sorted(mine_experts) == sorted(their_experts) and mine_experts
    shared_constant = json.loads(next(iter(Checkpoint.open(out).metadata.values()))["surgery_experts"])[-1]["role"]
    for key, value in mine_experts.items():
        if key.endswith("shared_expert.down_proj.weight") and "constant gate" in shared_constant:
            value = value / 2  # our constant gate is 1/2 and its down_proj carries x2: exact in binary floats
        assert torch.equal(value, their_experts[key]), key
    stored = {Checkpoint.open(out).info(name).dtype for name in Checkpoint.open(out).tensors}
    assert stored == {Checkpoint.open(corpus / "mergekit" / name).info(n).dtype
                      for n in Checkpoint.open(corpus / "mergekit" / name).tensors}


def test_noise_scale_adds_noise_of_that_std_to_every_expert_weight_as_mergekit_does(corpus, mergekit):
    base = load_model(corpus / "models" / "base").state_dict()
    for model in (load_model(ours(corpus, "noise_scale_upcycle")), load_model(corpus / "mergekit" / "noise_scale_upcycle")):
        experts = model.state_dict()
        for layer in range(2):
            fused = experts[f"model.layers.{layer}.mlp.experts.gate_up_proj"]  # [E, 2I, H]: gate rows, then up rows
            dense = torch.cat([base[f"model.layers.{layer}.mlp.gate_proj.weight"],
                               base[f"model.layers.{layer}.mlp.up_proj.weight"]])
            noise = fused - dense
            assert all(0.009 < float(noise[e].std()) < 0.011 and abs(float(noise[e].mean())) < 1e-3 for e in range(4))
            assert not torch.equal(noise[0], noise[1])
