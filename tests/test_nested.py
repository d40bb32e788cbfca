"""Multimodal hub checkpoints read as the text model they nest (Llama-4-Scout's Llama4ForConditionalGeneration,
Qwen3.5's Qwen3_5MoeForConditionalGeneration): opened with the text config and the text model's tensor names, run and
pruned as that model, written back in the multimodal layout with the vision tower copied byte for byte."""

import json

import pytest
import torch
from tiny_models import NESTED, logits, sample_ids, save_nested, tensors

import surgery
from surgery.execution.batches import batches as make_batches
from surgery.execution.layer_pass import LayerPass
from surgery.execution.placement import Placement
from surgery.execution.settings import MemoryBudget
from surgery.execution.weights import ModelWeights
from surgery.io.checkpoint import Checkpoint

ROWS = [list(range(3, 15)), list(range(20, 27)), [5, 80, 81, 7], list(range(40, 52))]  # padding in two rows
TOWERS = {"llama4": ("vision_model.", "multi_modal_projector."), "qwen3_5_moe": ("model.visual.",)}
TEXT = {"llama4": "language_model.", "qwen3_5_moe": "model.language_model."}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("nested"), {}

    def get(name):
        if name not in built:
            built[name] = save_nested(root / name, name, seed=3)
        return built[name]
    return get


def load(directory, model_class=None):
    """transformers' own load, strict (no missing or unexpected key): the multimodal class, or the text model
    AutoModelForCausalLM makes of the checkpoint (the other towers then unexpected, and ignored)."""
    import transformers

    loader = getattr(transformers, model_class) if model_class else transformers.AutoModelForCausalLM
    model, info = loader.from_pretrained(directory, output_loading_info=True, dtype=torch.float32,
                                         experts_implementation="eager")
    skipped = TOWERS[next(name for name in NESTED if NESTED[name][1] == json.loads(
        (directory / "config.json").read_text())["architectures"][0])] if not model_class else ()
    unexpected = [key for key in info["unexpected_keys"] if not key.startswith(skipped + ("mtp.",))]
    assert not info["missing_keys"] and not unexpected and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", NESTED)
def test_it_opens_as_the_text_model_with_the_other_towers_carried(hub, name):
    directory = hub(name)
    stored = tensors(directory)
    with Checkpoint.open(directory) as checkpoint:
        assert checkpoint.config["architectures"] == [surgery.families.FAMILIES[NESTED[name][2]].architecture]
        assert checkpoint.config == {**json.loads((directory / "config.json").read_text())["text_config"],
                                     "architectures": checkpoint.config["architectures"]}
        assert set(checkpoint.carried) == {key for key in stored if key.startswith(TOWERS[name])}
        assert "model.embed_tokens.weight" in checkpoint.tensors and "lm_head.weight" in checkpoint.tensors
        embed = checkpoint.read("model.embed_tokens.weight")
    assert torch.equal(embed, stored[TEXT[name] + ("model." if name == "llama4" else "") + "embed_tokens.weight"])


@pytest.mark.parametrize("name", NESTED)
def test_layer_by_layer_logits_equal_the_text_model_transformers_loads(hub, name):
    directory = hub(name)
    batches = list(make_batches(ROWS, 3, 12, 0))
    with Checkpoint.open(directory) as checkpoint:
        layer_pass = LayerPass(ModelWeights.from_checkpoint(checkpoint), batches, Placement.resolve("cpu"),
                               MemoryBudget.parse(None))
        out = {}
        layer_pass.head(layer_pass.forward(), lambda index, part, value, extra: out.setdefault(index, []).append(value))
    model = load(directory)
    for index, batch in enumerate(batches):
        with torch.no_grad():
            expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        real = batch.attention_mask.bool()
        assert torch.equal(torch.cat(out[index])[real], expected[real])


@pytest.mark.parametrize("name", NESTED)
def test_streamed_validation_equals_the_whole_model_pass(hub, name, token_file):
    whole = surgery.validate(hub(name), tokens=str(token_file), stream=False)
    streamed = surgery.validate(hub(name), tokens=str(token_file), stream=True)
    assert abs(whole["loss"] - streamed["loss"]) <= 1e-5


@pytest.mark.parametrize("name", NESTED)
def test_prune_ratio_zero_writes_every_tensor_it_keeps_byte_for_byte_in_the_source_layout(hub, name, tmp_path,
                                                                                          run_cli, token_file):
    source = hub(name)
    code, _, err = run_cli("prune", source, tmp_path / "out", "--ratio", 0, "--calibration", token_file)
    assert code == 0, err
    before, after = tensors(source), tensors(tmp_path / "out")
    assert set(after) == {key for key in before if not key.startswith("mtp.")}  # MTP layers are left out (noted)
    assert all(torch.equal(after[key], before[key]) for key in after)
    assert f"written as the source's {NESTED[name][1]}" in err
    ids = sample_ids()
    assert torch.equal(logits(load(tmp_path / "out", NESTED[name][1]), ids), logits(load(source, NESTED[name][1]), ids))


@pytest.mark.parametrize("name", NESTED)
def test_prune_half_is_written_nested_and_loads_in_the_multimodal_class(hub, name, tmp_path, run_cli, token_file):
    source = hub(name)
    code, _, err = run_cli("prune", source, tmp_path / "out", "--keep", 2, "--calibration", token_file)
    assert code == 0, err
    config, original = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "out", source))
    assert config["architectures"] == original["architectures"]
    assert config["vision_config"] == original["vision_config"]
    key = "num_local_experts" if name == "llama4" else "num_experts"
    assert config["text_config"][key] == 2 and original["text_config"][key] == 4
    before, after = tensors(source), tensors(tmp_path / "out")
    towers = [key for key in before if key.startswith(TOWERS[name])]
    assert towers and all(torch.equal(after[key], before[key]) for key in towers)
    model = load(tmp_path / "out", NESTED[name][1])  # strict
    assert torch.isfinite(logits(model, sample_ids())).all()


@pytest.mark.parametrize("name", NESTED)
def test_inspect_counts_the_text_model_and_reports_the_towers_apart(hub, name, run_cli):
    directory = hub(name)
    report = surgery.inspect(directory)
    text = load(directory)
    assert report.parameters == sum({v.data_ptr(): v.numel() for v in text.state_dict().values()}.values())
    towers = [value for key, value in tensors(directory).items() if key.startswith(TOWERS[name])]
    assert report.nested["carried_tensors"] == len(towers)
    assert report.nested["carried_parameters"] == sum(value.numel() for value in towers)
    assert not report.problems
    shown = " ".join(run_cli("inspect", directory)[1].split())  # as printed, wrapped at the terminal's width
    assert f"nested in {NESTED[name][1]}: the text model above; {len(towers)} tensors of its other towers" in shown


def test_copy_to_another_dtype_says_so_at_both_levels_of_the_config(hub, tmp_path, run_cli):
    code, _, err = run_cli("copy", hub("llama4"), tmp_path / "bf16", "--dtype", "bf16")
    assert code == 0, err
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == "bfloat16"
    stored = tensors(tmp_path / "bf16")
    assert all(value.dtype == torch.bfloat16 for key, value in stored.items() if key.startswith("language_model."))


def test_a_wrapper_config_without_its_text_config_is_refused_in_one_line(hub, tmp_path, run_cli):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in hub("llama4").iterdir():
        (broken / path.name).symlink_to(path)
    config = json.loads((hub("llama4") / "config.json").read_text())
    del config["text_config"]
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(config))
    code, stdout, err = run_cli("inspect", broken)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "a Llama4ForConditionalGeneration config needs a 'text_config' object (the text model's config), " \
           "found NoneType" in err
