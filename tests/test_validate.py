"""`surgery validate`: loss, comparison with references, --expect-exact, sample sources, placement."""

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_model, load_model, save_model

from surgery import families as arch
from surgery.checks import validation as validate_module
from surgery.checks.compare import tolerance_for
from surgery.checks.post_write import verify_exact
from surgery.checks.validation import evaluate, resolve_placement, validate
from surgery.errors import SurgeryError
from surgery.execution.settings import RunSettings
from surgery.io.checkpoint import Checkpoint

GIB = 2**30
ROWS = [list(range(3, 33)), list(range(40, 52)), [5, 80, 81, 82, 7, 9]]  # unequal lengths


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    llama = save_model(root / "llama", "llama", seed=1)
    ids = root / "ids.jsonl"
    ids.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return {"root": root, "llama": llama, "mixtral": save_model(root / "mixtral", "mixtral", seed=2),
            "upcycled": upcycle_by_hand(llama, root / "upcycled"), "ids": ids,
            "unit_llama": (unit_llama := save_unit_scale_llama(root / "unit_llama")),
            "unit_upcycled": upcycle_by_hand(unit_llama, root / "unit_upcycled")}


def save_unit_scale_llama(directory):
    """A tiny llama with weights ~ N(0, 1/fan_in) like a trained model's: the FFN moves the logits by O(1)
    (at the 0.02 init it barely does, which would hide a broken FFN below bfloat16 rounding)."""
    model = build_model("llama", seed=4)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
    model.save_pretrained(directory)
    return directory


def upcycle_by_hand(dense, out, experts=4, top_k=2):
    """Mixtral whose experts are copies of the dense FFN, random router: reproduces `dense` exactly."""
    llama, mixtral = arch.FAMILIES["llama"], arch.FAMILIES["mixtral"]
    generator = torch.Generator().manual_seed(0)
    with Checkpoint.open(dense, require_config=True) as source:
        config = arch.moe_config(llama, source.config, mixtral, num_experts=experts, top_k=top_k,
                                 expert_ffn=source.config["intermediate_size"])
        tensors = {}
        for name, entry in arch.expected_tensors(mixtral, config).items():
            if entry.group == "router":
                tensors[name] = torch.randn(entry.shape, generator=generator)
            elif entry.group == "experts":
                tensors[name] = source.read(llama.spec("ffn", entry.role).name(entry.layer)).clone()
            else:
                tensors[name] = source.read(name).clone()
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def perturbed_copy(directory, out, name, delta):
    shutil.copytree(directory, out)
    tensors = load_file(out / "model.safetensors")
    tensors[name] = tensors[name] + delta
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def char_tokenizer(directory):
    """A character-level tokenizer with the tiny models' 96-token vocabulary."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(code): code - 29 for code in range(32, 125)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(directory)


def hf_loss(directory, rows):
    """Token-weighted mean next-token loss from transformers itself, one unpadded row at a time."""
    model = load_model(directory)
    total = count = 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            total += model(input_ids=ids, labels=ids).loss.item() * (len(row) - 1)
            count += len(row) - 1
    return total / count


# ------------------------------------------------------------------ exactness
def mlp_difference(model_dir, reference_dir, layer, rows):
    """‖Δ‖/‖reference‖ of layer `layer`'s FFN output on the reference's own inputs, by transformers itself."""
    reference, model = load_model(reference_dir), load_model(model_dir)
    seen = []
    handle = reference.model.layers[layer].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        for row in rows:
            reference(input_ids=torch.tensor([row]))
    handle.remove()
    delta = norm = 0.0
    with torch.no_grad():
        for value in seen:
            expected = reference.model.layers[layer].mlp(value)
            delta += float((model.model.layers[layer].mlp(value) - expected).double().square().sum())
            norm += float(expected.double().square().sum())
    return (delta / norm) ** 0.5


def test_dense_model_against_itself_is_exact(built):
    report = verify_exact(built["llama"], built["llama"], RunSettings("cpu"))
    assert report["passed"] and report["tolerance"] == 1e-5 and report["max_relative"] == 0.0
    assert len(report["layers"]) == 2 and report["head"] == 0.0


def test_perturbed_tensor_fails_expect_exact_naming_the_layer_and_the_difference(built, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    bad = perturbed_copy(built["llama"], tmp_path / "bad", name, 1e-2)
    with pytest.raises(SurgeryError) as failure:
        validate(bad, [built["llama"]], tokens=built["ids"], device="cpu", expect_exact=True)
    message = str(failure.value)
    shown = float(re.search(r"layer 1: FFN output differs from the reference's by ([0-9.e+-]+)", message).group(1))
    assert shown == pytest.approx(mlp_difference(bad, built["llama"], 1, ROWS), rel=0.05)
    assert "(relative; tolerance 1.0e-05 in float32)" in message and str(bad) in message


def test_upcycled_model_is_exact_in_float32_and_within_the_bfloat16_tolerance(built):
    model, reference = built["unit_upcycled"], built["unit_llama"]
    fp32 = validate(model, [reference], tokens=built["ids"], device="cpu", expect_exact=True)
    bf16 = validate(model, [reference], tokens=built["ids"], device="cpu", dtype="bfloat16",
                    expect_exact=True)  # bf16 on CPU with an expert size (44) that is not a multiple of 8
    assert fp32["exact"]["passed"] and fp32["exact"]["max_relative"] < 1e-6
    assert bf16["exact"]["dtype"] == "bfloat16" and bf16["exact"]["tolerance"] == 2.0**-6
    assert 1e-6 < bf16["exact"]["max_relative"] <= bf16["exact"]["tolerance"]  # rounding, not float32-exact
    assert [layer["layer"] for layer in bf16["routing"]] == [0, 1]


def test_missing_expert_scale_fails_in_bfloat16_at_its_layer(built, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(built["unit_upcycled"], bad)
    tensors = load_file(bad / "model.safetensors")
    for expert in range(4):  # what a split that forgot to scale down_proj would produce
        tensors[f"model.layers.0.block_sparse_moe.experts.{expert}.w2.weight"] *= 0.5
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    result = evaluate(bad, [built["unit_llama"]], tokens=built["ids"], device="cpu", dtype="bfloat16",
                      expect_exact=True)
    found = result["exact"]["first_difference"]
    assert (found["where"], found["part"]) == ("layer 0", "mlp") and found["relative"] == pytest.approx(0.5, abs=0.02)
    assert result["exact"]["message"].startswith("layer 0: MoE output differs from the dense FFN by 5.0e-01")


def test_renamed_tensor_is_refused_with_the_key_named(built, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(built["llama"], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.self_attn.q.weight"] = tensors.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SurgeryError, match=r"missing tensor model\.layers\.0\.self_attn\.q_proj\.weight.*"
                                           r"unexpected tensor model\.layers\.0\.self_attn\.q\.weight"):
        validate(bad, device="cpu")


def test_nan_weights_are_refused_after_loading(built, tmp_path):
    bad = perturbed_copy(built["llama"], tmp_path / "bad", "model.layers.1.self_attn.o_proj.weight", float("nan"))
    with pytest.raises(SurgeryError, match=r"NaN or Inf in model\.layers\.1\.self_attn\.o_proj\.weight after loading in float32"):
        validate(bad, device="cpu")


def test_float16_overflow_is_refused_after_loading(built, tmp_path):
    big = perturbed_copy(built["llama"], tmp_path / "big", "model.norm.weight", 1e5)  # > float16 max 65504
    assert validate(big, tokens=built["ids"], device="cpu")["loss"] is not None
    with pytest.raises(SurgeryError, match=r"NaN or Inf in model\.norm\.weight after loading in float16"):
        validate(big, tokens=built["ids"], device="cpu", dtype="float16")


def test_expect_exact_needs_exactly_one_reference(built):
    with pytest.raises(SurgeryError, match="--expect-exact needs exactly one --reference, got 0"):
        validate(built["llama"], expect_exact=True)


def test_reference_with_another_vocabulary_is_refused(built, tmp_path):
    other = save_model(tmp_path / "other", "llama", vocab_size=100)
    with pytest.raises(SurgeryError, match="vocab_size 100 differs from MODEL's 96"):
        validate(built["llama"], [other], device="cpu")


# ------------------------------------------------------------------ loss and padding
def test_loss_is_the_transformers_loss(built):
    result = validate(built["llama"], tokens=built["ids"], device="cpu")
    assert result["loss"] == pytest.approx(hf_loss(built["llama"], ROWS), rel=1e-5)
    assert result["predicted_tokens"] == sum(len(row) - 1 for row in ROWS)
    assert result["sample"]["tokens"] == sum(len(row) for row in ROWS)


def test_padding_does_not_change_the_loss(built):
    padded = validate(built["mixtral"], [built["llama"]], tokens=built["ids"], batch_size=3, device="cpu")
    unpadded = validate(built["mixtral"], [built["llama"]], tokens=built["ids"], batch_size=1, device="cpu")
    assert padded["sample"]["batches"] == 1 and unpadded["sample"]["batches"] == 3
    assert padded["loss"] == pytest.approx(unpadded["loss"], rel=1e-6)
    for key in ("loss", "mean_kl", "top1_agreement", "max_abs_diff"):
        assert padded["references"][0][key] == pytest.approx(unpadded["references"][0][key], rel=1e-5), key
    for a, b in zip(padded["routing"], unpadded["routing"]):
        assert a["share"] == pytest.approx(b["share"], abs=1e-12)


def test_max_tokens_bounds_the_evaluation(built):
    result = validate(built["llama"], tokens=built["ids"], max_tokens=35, device="cpu")
    assert result["sample"]["tokens"] == 35
    assert result["loss"] == pytest.approx(hf_loss(built["llama"], [ROWS[0], ROWS[1][:5]]), rel=1e-5)


def test_references_loaded_one_at_a_time_give_the_same_numbers(built, monkeypatch):
    together = validate(built["mixtral"], [built["llama"], built["upcycled"]], tokens=built["ids"], device="cpu")
    model_bytes = 4 * sum(info.numel for info in Checkpoint.open(built["mixtral"]).tensors.values())
    monkeypatch.setattr(validate_module, "available_memory", lambda placement: int(model_bytes / 0.7) + 1)
    apart = validate(built["mixtral"], [built["llama"], built["upcycled"]], tokens=built["ids"], device="cpu")
    assert any("loaded one at a time" in note for note in apart["notes"]) and apart["timing"]["passes"] == 2
    assert together["timing"]["passes"] == 1
    assert apart["loss"] == together["loss"] and apart["routing"] == together["routing"]
    assert apart["references"] == together["references"]


def same_numbers(streamed, whole, tolerance=1e-5):
    assert streamed["loss"] == pytest.approx(whole["loss"], abs=tolerance)
    for mine, theirs in zip(streamed["references"], whole["references"]):
        for key in ("loss", "mean_kl", "top1_agreement", "max_abs_diff"):
            assert mine[key] == pytest.approx(theirs[key], abs=tolerance), key
    for mine, theirs in zip(streamed["routing"] or [], whole["routing"] or []):
        assert mine["share"] == pytest.approx(theirs["share"], abs=tolerance)
        assert mine["router_entropy"] == pytest.approx(theirs["router_entropy"], abs=tolerance)


def test_layer_by_layer_evaluation_gives_the_whole_model_numbers(built):
    whole = validate(built["mixtral"], [built["llama"], built["upcycled"]], tokens=built["ids"], device="cpu")
    streamed = validate(built["mixtral"], [built["llama"], built["upcycled"]], tokens=built["ids"], device="cpu",
                        stream=True)
    assert streamed["layer_by_layer"] and not whole["layer_by_layer"]
    assert any("running layer by layer (--stream)" in note for note in streamed["notes"])
    same_numbers(streamed, whole)


def test_a_model_larger_than_memory_is_run_layer_by_layer_with_the_same_numbers(built, monkeypatch):
    whole = validate(built["upcycled"], [built["llama"]], tokens=built["ids"], device="cpu")
    monkeypatch.setattr(validate_module, "available_memory", lambda placement: 1000)
    streamed = validate(built["upcycled"], [built["llama"]], tokens=built["ids"], device="cpu")
    assert streamed["layer_by_layer"] and any("does not fit" in note for note in streamed["notes"])
    same_numbers(streamed, whole)


def test_the_logits_of_a_large_vocabulary_are_compared_in_chunks_of_rows(built, monkeypatch):
    from surgery.execution import runner

    whole = validate(built["mixtral"], [built["llama"]], tokens=built["ids"], device="cpu")
    monkeypatch.setattr(runner, "HEAD_CHUNK_BYTES", 1)  # one row at a time
    streamed = validate(built["mixtral"], [built["llama"]], tokens=built["ids"], device="cpu", stream=True)
    same_numbers(streamed, whole)
    assert streamed["references"][0]["max_abs_diff_at"] == whole["references"][0]["max_abs_diff_at"]


# ------------------------------------------------------------------ sample sources
def test_without_tokenizer_pseudo_random_ids_are_seeded_and_said(built):
    first = validate(built["llama"], batch_size=2, seq_len=16, device="cpu")
    second = validate(built["llama"], batch_size=2, seq_len=16, device="cpu")
    assert first["loss"] == second["loss"] and first["sample"]["tokens"] == 32
    assert first["sample"]["source"] == "pseudo-random token ids (seed 0)"
    assert any("pseudo-random token ids" in note for note in first["notes"])


def test_text_is_tokenised_with_the_checkpoint_tokenizer(built, tmp_path):
    model = shutil.copytree(built["llama"], tmp_path / "m")
    char_tokenizer(model)
    result = validate(model, text="hello world", device="cpu")
    assert result["sample"]["tokens"] == len("hello world") + 1  # bos
    ids = [1] + [ord(c) - 29 for c in "hello world"]
    assert result["loss"] == pytest.approx(hf_loss(built["llama"], [ids]), rel=1e-5)
    data = tmp_path / "data.txt"
    data.write_text("hello world")
    assert validate(model, data=data, device="cpu")["loss"] == result["loss"]


def test_text_without_tokenizer_is_refused(built):
    with pytest.raises(SurgeryError, match="no tokenizer .* pass ids with --tokens"):
        validate(built["llama"], text="hello", device="cpu")


def test_npy_tokens_are_cut_into_rows_of_seq_len(built, tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(3, 53))
    result = validate(built["llama"], tokens=path, seq_len=16, device="cpu")
    assert result["sample"]["tokens"] == 50 and result["sample"]["batches"] == 1


def test_sample_sources_are_exclusive(built):
    with pytest.raises(SurgeryError, match="--text and --tokens are exclusive"):
        validate(built["llama"], text="x", tokens=built["ids"])


# ------------------------------------------------------------------ device and dtype
def test_auto_placement_without_gpu_is_cpu_float32():
    placement = resolve_placement("auto", "auto", 10**6, gpus=[])
    assert (placement.device, placement.dtype, placement.device_map) == ("cpu", torch.float32, None)


def test_auto_placement_with_gpu_is_cuda_bfloat16():
    placement = resolve_placement("auto", "auto", 10**9, gpus=[80 * GIB])
    assert (placement.device, placement.dtype, placement.device_map, placement.notes) == ("cuda", torch.bfloat16, None, [])


def test_model_larger_than_one_gpu_is_spread_with_a_device_map_and_said():
    placement = resolve_placement("auto", "auto", 50 * 10**9, gpus=[80 * GIB, 80 * GIB])  # 100 GB in bf16
    assert placement.device_map == "auto" and placement.device == "cuda"
    assert "spread over 2 GPU(s)" in placement.notes[0] and "device_map='auto'" in placement.notes[0]
    offloaded = resolve_placement("cuda", "float32", 50 * 10**9, gpus=[80 * GIB])  # 200 GB
    assert "offloaded to CPU" in offloaded.notes[0]


def test_explicit_cuda_without_gpu_is_refused():
    with pytest.raises(SurgeryError, match="--device cuda: no CUDA device"):
        resolve_placement("cuda", "auto", 10, gpus=[])
    with pytest.raises(SurgeryError, match="cuda:N with N < 1"):
        resolve_placement("cuda:1", "auto", 10, gpus=[80 * GIB])
    assert resolve_placement("cpu", "float16", 10, gpus=[80 * GIB]).dtype == torch.float16


def test_layer_tolerances_per_dtype():
    assert tolerance_for("float32") == 1e-5
    assert tolerance_for("float32", "BF16") == 2.0**-8  # scaled weights rounded to bfloat16 on purpose
    assert tolerance_for("bfloat16") == 2.0**-6
    assert tolerance_for("float16", "F16") == 2.0**-9


@pytest.mark.parametrize("expert_ffn, dtype, implementation", [
    (20, "float32", "eager"),  # 80-byte strides: grouped_mm would take them, but was not faster on CPU
    (21, "float32", "eager"),  # 84-byte strides: grouped_mm would refuse them
    (20, "bfloat16", "eager"),  # 40-byte strides
])
def test_cpu_experts_run_the_eager_loop_for_any_expert_size(tmp_path, expert_ffn, dtype, implementation):
    directory = save_model(tmp_path / "m", "mixtral", intermediate_size=expert_ffn)
    rows = [list(range(3, 30))]
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps(rows[0]) + "\n")
    result = validate(directory, tokens=ids, device="cpu", dtype=dtype)
    assert result["experts_implementation"] == implementation
    model = build_model("mixtral", intermediate_size=expert_ffn)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(rows), labels=torch.tensor(rows)).loss.item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5 if dtype == "float32" else 2e-2)


# ------------------------------------------------------------------ command line
def test_cli_json_report(built, run_cli):
    code, out, err = run_cli("validate", built["mixtral"], "-r", built["mixtral"], "--tokens", built["ids"],
                             "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["sample"]["tokens"] == 48
    assert report["references"][0]["max_abs_diff"] == 0.0
    assert [layer["layer"] for layer in report["routing"]] == [0, 1]
    assert all(sum(layer["share"]) == pytest.approx(1.0) for layer in report["routing"])


def test_cli_tables_and_failed_expect_exact(built, tmp_path, run_cli):
    bad = perturbed_copy(built["mixtral"], tmp_path / "bad", "model.norm.weight", 0.5)
    code, out, err = run_cli("validate", bad, "-r", built["mixtral"], "--tokens", built["ids"], "--expect-exact")
    assert code == 2
    assert "routing" in out and "expect-exact: FAILED" in out
    assert "surgery: error:" in err and "logits (final norm and head) differ from the reference's by 4.9e-01" in err
    assert "tolerance 1.0e-05 in float32" in err


def test_cli_structure_only_loads_nothing(built, tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr("surgery.execution.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, out, _ = run_cli("validate", built["llama"], "--structure-only", "--json")
    assert code == 0 and json.loads(out)["problems"] == [] and json.loads(out)["scanned"]
    bad = perturbed_copy(built["llama"], tmp_path / "bad", "model.norm.weight", float("inf"))
    code, out, err = run_cli("validate", bad, "--structure-only")
    assert code == 2 and "tensor 'model.norm.weight' has 0 NaN and 32 Inf values" in err


def test_cli_plot_without_matplotlib_is_a_clear_error(built, tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run_cli("validate", built["mixtral"], "--plot", tmp_path / "load.png")
    assert code == 2 and "--plot needs matplotlib" in err and not (tmp_path / "load.png").exists()


def test_cli_plot_of_a_dense_model_is_refused(built, tmp_path, run_cli):
    code, _, err = run_cli("validate", built["llama"], "--plot", tmp_path / "load.png")
    assert code == 2 and "is a dense model; there is no routing to plot" in err


def test_cli_plot_writes_a_png(built, tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    code, _, err = run_cli("validate", built["mixtral"], "--tokens", built["ids"], "--plot", tmp_path / "load.png")
    assert code == 0, err
    assert (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
