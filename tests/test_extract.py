"""`surgery extract`: MoE -> dense, one expert's FFN or the experts' weights averaged, per MoE layer."""

import json

import pytest
import torch
from safetensors import safe_open

from surgery import families as arch
from tiny_models import load_model, logits, sample_ids, save_model

UPCYCLES = [("llama", "mixtral", "mistral"), ("mistral", "mixtral", "mistral"), ("qwen2", "qwen2_moe", "qwen2"),
            ("qwen3", "qwen3_moe", "qwen3"), ("olmo2", "flex_olmo", "olmo2"), ("granite", "granitemoe", "granite")]
LAYOUTS = ["per-expert", "fused"]
HF_MOES = [("mixtral", "mistral"), ("qwen3_moe", "qwen3"), ("granitemoe", "granite"), ("flex_olmo", "olmo2")]


def tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def expert_weights(directory, layer):
    """{role: [tensor of each expert]} of one MoE layer, whatever the stored layout."""
    config = config_of(directory)
    family = arch.detect_family(config)
    stored = tensors(directory)
    count = arch.dimensions(family, config)["experts"]
    if arch.detect_expert_layout(family, stored) == "per_expert":
        return {spec.role: [stored[spec.name(layer, e)] for e in range(count)] for spec in family.experts}
    gate_up, down = (stored[spec.name(layer)] for spec in family.fused_experts)
    ffn = gate_up.shape[1] // 2
    return {"gate": [gate_up[e, :ffn] for e in range(count)], "up": [gate_up[e, ffn:] for e in range(count)],
            "down": [down[e] for e in range(count)]}


@pytest.fixture
def upcycled(tmp_path, run_cli):
    def make(dense, moe, layout, *extra):
        source = save_model(tmp_path / dense, dense)
        out = tmp_path / f"{moe}-{layout}"
        code, _, err = run_cli("upcycle", source, out, "-n", 4, "-k", 2, "--format", moe, "--layout", layout, *extra)
        assert code == 0, err
        return source, out
    return make


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dense,moe,family", UPCYCLES)
def test_one_expert_of_an_upcycled_moe_is_the_dense_source(dense, moe, family, layout, upcycled, tmp_path, run_cli):
    if layout == "per-expert" and arch.FAMILIES[moe].stored_layouts == ("fused",):
        pytest.skip(f"{moe} stores its experts fused only")
    source, upcycled_moe = upcycled(dense, moe, layout)
    out = tmp_path / "extracted"
    extra = ["--shared-gate", "drop"] if arch.FAMILIES[moe].shared_expert else []
    code, _, err = run_cli("extract", upcycled_moe, out, "--expert", 2, *extra)
    assert code == 0, err
    config = config_of(out)
    assert config["model_type"] == family and config["intermediate_size"] == config_of(source)["intermediate_size"]
    written, original = tensors(out), tensors(source)
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    ids = sample_ids()
    assert torch.allclose(logits(load_model(out), ids), logits(load_model(source), ids), atol=1e-5)
