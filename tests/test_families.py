"""The families name and shape every tensor exactly as transformers saves it, and translate configs."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import CONFIGS, save_model

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_expected_tensors_match_what_transformers_saves(tmp_path, family):
    directory = save_model(tmp_path / family, family)
    checkpoint = Checkpoint.open(directory, require_config=True)
    found = arch.detect_family(checkpoint.config)
    assert found.name == family
    layout = arch.detect_expert_layout(found, checkpoint.tensors)
    expected = arch.expected_tensors(found, checkpoint.config, layout)
    mtp = set(arch.mtp_tensors(found, checkpoint.config, checkpoint.tensors))  # hub MTP layers, outside the model
    assert {name: e.shape for name, e in expected.items()} == {
        n: i.shape for n, i in checkpoint.tensors.items() if n not in mtp}


@pytest.mark.parametrize("family,key", [("llama", "attention_bias"), ("qwen3", "attention_bias")])
def test_bias_tensors_follow_the_config_flag(tmp_path, family, key):
    directory = save_model(tmp_path / family, family, **{key: True})
    checkpoint = Checkpoint.open(directory, require_config=True)
    expected = arch.expected_tensors(arch.detect_family(checkpoint.config), checkpoint.config)
    assert set(expected) == set(checkpoint.tensors)
    assert any(name.endswith("q_proj.bias") for name in expected)


def test_tied_embeddings_have_no_lm_head(tmp_path):
    directory = save_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    checkpoint = Checkpoint.open(directory, require_config=True)
    expected = arch.expected_tensors(arch.detect_family(checkpoint.config), checkpoint.config)
    assert "lm_head.weight" not in expected and set(expected) == set(checkpoint.tensors)


def test_qwen_moe_dense_layers_follow_mlp_only_layers(tmp_path):
    directory = save_model(tmp_path / "q", "qwen2_moe", mlp_only_layers=[1])
    checkpoint = Checkpoint.open(directory, require_config=True)
    family = arch.detect_family(checkpoint.config)
    assert [arch.is_moe_layer(family, checkpoint.config, layer) for layer in range(2)] == [True, False]
    assert set(arch.expected_tensors(family, checkpoint.config)) == set(checkpoint.tensors)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(SurgeryError, match=r"'GPT2LMHeadModel' is not supported \(supported: ") as raised:
        arch.detect_family({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    assert all(f"{family.architecture} ({name})" in str(raised.value) for name, family in arch.FAMILIES.items())


def test_heads_that_do_not_divide_are_refused():
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
              "num_key_value_heads": 3, "vocab_size": 10, "num_hidden_layers": 1, "intermediate_size": 8}
    with pytest.raises(SurgeryError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        arch.dimensions(arch.FAMILIES["llama"], config)


def test_moe_config_carries_rope_and_sets_moe_keys():
    source = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0},
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_theta": 500000.0,
              "rms_norm_eps": 1e-5, "head_dim": 8, "max_position_embeddings": 4096, "tie_word_embeddings": True,
              "bos_token_id": 5, "eos_token_id": [6, 7], "intermediate_size": 44}
    family = arch.FAMILIES["llama"]
    target = arch.moe_target(family, "auto", source)
    config = arch.moe_config(family, source, target, num_experts=8, top_k=2, expert_ffn=44)
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "rms_norm_eps", "head_dim",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == source[key], key
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (8, 2, 44)
    assert config["sliding_window"] is None


def test_qwen3_moe_config_uses_num_experts_and_normalised_topk():
    source = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "intermediate_size": 44}
    family = arch.FAMILIES["qwen3"]
    config = arch.moe_config(family, source, arch.moe_target(family, "auto", source), num_experts=4, top_k=2, expert_ffn=44)
    assert config["num_experts"] == 4 and config["norm_topk_prob"] is True and config["moe_intermediate_size"] == 44


def test_bias_source_cannot_become_mixtral():
    with pytest.raises(SurgeryError, match="attention_bias is true, but mixtral has no such weights"):
        arch.moe_target(arch.FAMILIES["llama"], "mixtral", {"attention_bias": True})


def test_qwen2_cannot_become_mixtral():
    with pytest.raises(SurgeryError, match="a qwen2 model cannot become mixtral"):
        arch.moe_target(arch.FAMILIES["qwen2"], "mixtral", {})


def test_mixtral_refuses_dense_layers():
    source = {"architectures": ["LlamaForCausalLM"], "intermediate_size": 44}
    family = arch.FAMILIES["llama"]
    with pytest.raises(SurgeryError, match="mixtral makes every layer MoE"):
        arch.moe_config(family, source, arch.FAMILIES["mixtral"], num_experts=4, top_k=2, expert_ffn=44, dense_layers=[1])


# ------------------------------------------------------------------- the registry
PACKAGE = Path(arch.__file__).parent
MACHINERY = {"__init__", "base", "registry", "convert", "sliding", "moe_layers", "dense_form", "nesting"}


def _family_module_names() -> set[str]:
    return {path.stem for path in PACKAGE.glob("*.py")} - MACHINERY


def test_each_family_module_defines_exactly_its_family():
    names = _family_module_names()
    assert names and sorted(names) == arch.family_modules()
    for name in names:
        module = importlib.import_module(f"surgery.families.{name}")
        defined = [value for value in vars(module).values() if isinstance(value, arch.Family)]
        assert defined == [module.FAMILY] and module.FAMILY.name == name, name
        assert arch.FAMILIES[name] is module.FAMILY
    assert set(arch.FAMILIES) == names


def test_every_family_has_a_tiny_model():
    assert set(CONFIGS) == set(arch.FAMILIES)


def test_registry_order_is_dense_then_moe_and_the_tables_come_from_the_families():
    families = list(arch.FAMILIES.values())
    assert families == sorted(families, key=lambda f: (f.kind != "dense", f.name))
    moe = tuple(f.name for f in families if f.kind == "moe")
    assert tuple(arch.TARGET_SETTINGS) == moe
    built = {target for f in families for target in f.conversions}  # the formats a dense model becomes
    assert arch.moe_formats() == tuple(name for name in moe if name in built)
    for family in families:
        if family.kind == "dense":
            assert family.conversions and family.default_target in family.conversions, family.name
            assert not family.target_settings and not family.mergekit_names, family.name
            for target, conversion in family.conversions.items():
                assert target in moe and arch.CONVERSIONS[(family.name, target)] is conversion
        else:
            assert family.kind == "moe" and not family.conversions and family.default_target is None, family.name
            assert {"experts", "top_k", "expert_ffn"} <= set(family.moe_keys), family.name
            assert callable(family.sparse_layers), family.name
    assert set(arch.CONVERSIONS) == {(f.name, t) for f in families for t in f.conversions}
    assert arch.DEFAULT_TARGET == {f.name: f.default_target for f in families if f.kind == "dense"}


def test_importing_the_families_imports_neither_torch_nor_transformers():
    code = ("import sys, surgery.families\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_format_choices_are_the_registered_moe_formats():
    from surgery import split, upcycle
    from surgery.btx import spec as merge_config
    from surgery.btx_merge import command as merge_command

    formats = ("auto", *arch.moe_formats())
    assert upcycle.FORMATS == split.FORMATS == merge_config.FORMATS == formats
    [option] = [p for p in merge_command.params if p.name == "fmt" or "--format" in getattr(p, "opts", ())]
    assert tuple(option.type.choices) == formats
    from surgery.btx.mergekit import architectures

    assert architectures() == {"mixtral": "mixtral", "qwen moe": "qwen2_moe", "qwen3 moe": "qwen3_moe"}


# ------------------------------------------------------------------- no family names outside the family modules
def _family_name_literals(node) -> list[str]:
    values = node.keys + node.values if isinstance(node, ast.Dict) else getattr(node, "elts", [])
    return [v.value for v in values if isinstance(v, ast.Constant) and v.value in arch.FAMILIES]


def family_name_uses(tree) -> list[tuple[int, str]]:
    """Comparisons with a family name, and literal collections of two or more family names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = (node.left, *node.comparators)
            if any(isinstance(s, ast.Constant) and s.value in arch.FAMILIES or _family_name_literals(s) for s in sides):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.MatchValue):
            if isinstance(node.value, ast.Constant) and node.value.value in arch.FAMILIES:
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and len(_family_name_literals(node)) >= 2:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_scan_finds_family_name_logic():
    code = ('if target.name == "mixtral":\n    pass\n'
            'ok = name in ("qwen2_moe",)\n'
            'FORMATS = ("auto", "mixtral", "qwen3_moe")\n'
            'ALIASES = {"qwen": "qwen2_moe", "x": "qwen3_moe"}\n'
            'match name:\n    case "llama":\n        pass\n'
            'fine = ("mixtral is named in prose", "auto", kind == "moe", sparse == "qwen")\n')
    assert sorted(line for line, _ in family_name_uses(ast.parse(code))) == [1, 3, 4, 5, 7]


def test_no_code_outside_the_family_modules_names_a_family():
    """Only a family's own module may name families; everything else reads the registry.

    Scans every source file under surgery/ except the family modules themselves (the machinery of
    surgery/families/ included)."""
    root = PACKAGE.parent
    family_modules = {PACKAGE / f"{name}.py" for name in _family_module_names()}
    found = [f"{path.relative_to(root.parent)}:{line}: {text}"
             for path in sorted(root.rglob("*.py")) if path not in family_modules
             for line, text in family_name_uses(ast.parse(path.read_text(), str(path)))]
    assert not found, "family names used outside surgery/families/<family>.py:\n" + "\n".join(found)
