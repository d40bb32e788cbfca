"""Phi-3 (fused qkv_proj and gate_up_proj) as a source: every operation reads its roles as views of the fused tensors."""

import pytest
import torch
from tiny_models import load_model, logits, sample_ids, save_model, tensors

LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 2.5, 3.0, 3.5],
            "original_max_position_embeddings": 16}


def assert_reproduces(out, source, ids=None):
    ids = sample_ids(96) if ids is None else ids
    assert torch.allclose(logits(load_model(out), ids), logits(load_model(source), ids), atol=1e-5)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("phi3") / "src", "phi3")




def test_upcycle_writes_mixtral_whose_q_k_v_and_w1_w3_are_the_fused_rows(tmp_path, run_cli, phi3):
    assert run_cli("upcycle", phi3, tmp_path / "out", "-n", "4", "-k", "2", "--verify")[0] == 0
    out, source = tensors(tmp_path / "out"), tensors(phi3)
    qkv, gate_up = source["model.layers.1.self_attn.qkv_proj.weight"], source["model.layers.1.mlp.gate_up_proj.weight"]
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], qkv[:32])
    assert torch.equal(out["model.layers.1.self_attn.k_proj.weight"], qkv[32:48])
    assert torch.equal(out["model.layers.1.self_attn.v_proj.weight"], qkv[48:])
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.3.w1.weight"], gate_up[:44])
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.3.w3.weight"], gate_up[44:])
    assert_reproduces(tmp_path / "out", phi3)


def test_calibrated_upcycle_reproduces_the_source(tmp_path, run_cli, phi3, token_file):
    code, _, err = run_cli("upcycle", phi3, tmp_path / "out", "-n", "4", "-k", "2", "--router-init", "calibrated",
                           "--calibration", token_file)
    assert code == 0, err
    assert_reproduces(tmp_path / "out", phi3)


@pytest.mark.parametrize("strategy", ["random", "clustering", "coactivation"])
def test_split_at_k_equal_n_reproduces_the_source(tmp_path, run_cli, phi3, token_file, strategy):
    data = ["--calibration", token_file] if strategy == "coactivation" else []
    code, _, err = run_cli("split", phi3, tmp_path / "out", "-n", "4", "-k", "4", "--strategy", strategy,
                           "--router-init", "zero", "--verify", *data)
    assert code == 0, err
    assert_reproduces(tmp_path / "out", phi3)


def test_merging_copies_of_one_phi3_reproduces_it(tmp_path, run_cli, phi3):
    code, _, err = run_cli("merge", tmp_path / "out", "--expert", f"a={phi3}", "--expert", f"b={phi3}",
                           "--router-init", "zero")
    assert code == 0, err
    assert_reproduces(tmp_path / "out", phi3)


def test_long_context_rope_is_carried_and_exact_beyond_the_original_length(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "phi3", rope_parameters=LONGROPE, max_position_embeddings=64, head_dim=8)
    assert run_cli("upcycle", source, tmp_path / "out", "-n", "4", "-k", "2")[0] == 0
    assert load_model(tmp_path / "out").config.rope_parameters["long_factor"] == LONGROPE["long_factor"]
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(0))  # longer than 16: long factors
    assert_reproduces(tmp_path / "out", source, ids)


def test_partial_rotary_is_refused_before_writing(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "phi3", head_dim=8,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})
    code, _, err = run_cli("upcycle", source, tmp_path / "out", "-n", "4", "-k", "2")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"surgery: error: {source / 'config.json'}: rope_parameters.partial_rotary_factor is 0.75, but mixtral's "
        "attention rotates every dimension of each head (it needs 1.0), so the result could not reproduce the source")
    assert not (tmp_path / "out").exists()


def test_inspect_strict_accepts_the_fused_tensors(run_cli, phi3):
    code, out, err = run_cli("inspect", phi3, "--strict")
    assert code == 0, err
    assert "no problems found" in out
