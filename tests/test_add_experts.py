"""`surgery add-experts`: each dense model's FFN as a new routed expert, its router row fitted on its text."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery import families as arch
from surgery.routing import router_modules
from tiny_models import load_model, save_model, tensors

CASES = [("mixtral", "per-expert"), ("mixtral", "fused"), ("qwen3_moe", "per-expert"), ("qwen3_moe", "fused"),
         ("granitemoe", "fused")]


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def experts_of(directory):
    """{(role, layer, expert): tensor}, whatever the stored layout; and the router weights {layer: tensor}."""
    config = config_of(directory)
    family = arch.detect_family(config)
    stored = tensors(directory)
    dims = arch.dimensions(family, config)
    out, routers = {}, {}
    layout = arch.detect_expert_layout(family, stored)
    router = family.fused_router or family.router if layout == "fused" else family.router
    for layer in range(dims["layers"]):
        routers[layer] = stored[router.name(layer)]
        if layout == "per_expert":
            for spec in family.experts:
                for e in range(dims["experts"]):
                    out[(spec.role, layer, e)] = stored[spec.name(layer, e)]
            continue
        gate_up, down = (stored[spec.name(layer)] for spec in family.fused_experts)
        ffn = gate_up.shape[1] // 2
        for e in range(dims["experts"]):
            out.update({("gate", layer, e): gate_up[e, :ffn], ("up", layer, e): gate_up[e, ffn:],
                        ("down", layer, e): down[e]})
    return out, routers


def domain_tokens(path, seed, low=3, high=14, rows=8, length=40):
    """Token ids of a 'domain': a narrow band of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    path.write_text("".join(json.dumps(torch.randint(low, high, (length,), generator=generator).tolist()) + "\n"
                            for _ in range(rows)))
    return path


@pytest.fixture
def dense_of(tmp_path, run_cli):
    """make(moe, name): a dense model of the MoE's dense family and shapes with a random FFN of its own."""
    def make(moe, name, seed=7):
        out = tmp_path / name
        code, _, err = run_cli("extract", moe, out, "--expert", 0)
        assert code == 0, err
        family = arch.detect_family(config_of(out))
        generator = torch.Generator().manual_seed(seed)
        for path in out.glob("*.safetensors"):
            stored = load_file(str(path))
            for key, value in stored.items():
                if any(key == family.spec("ffn", role).name(layer) for role in ("gate", "up", "down")
                       for layer in range(8)):
                    stored[key] = torch.randn(value.shape, generator=generator).to(value.dtype) * 0.05
            save_file(stored, str(path), metadata={"format": "pt"})
        return out
    return make


def top1_share(directory, token_path, index):
    """{MoE layer: share of the text's tokens whose highest router logit is expert `index`}, from transformers'
    own model (a pre-hook on each router module)."""
    model = load_model(directory)
    routers = router_modules(model)
    captured = {layer: [] for layer in routers}
    handles = [module.register_forward_pre_hook(lambda _m, args, layer=layer: captured[layer].append(args[0]))
               for layer, module in routers.items()]
    ids = torch.tensor([json.loads(line) for line in token_path.read_text().splitlines()])
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    shares = {}
    for layer, module in routers.items():
        inputs = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured[layer]])
        shares[layer] = float(((inputs @ module.weight.T).argmax(dim=-1) == index).float().mean())
    return shares


@pytest.mark.parametrize("family,layout", CASES)
def test_new_expert_is_the_dense_ffn_and_wins_its_domain(family, layout, moe, dense_of, tmp_path, run_cli):
    source = moe(family, layout)
    dense = dense_of(source, "code")
    train, held_out = domain_tokens(tmp_path / "train.jsonl", 1), domain_tokens(tmp_path / "held.jsonl", 2)
    out = tmp_path / "added"
    code, _, err = run_cli("add-experts", source, out, "--expert", f"code={dense}", "--calibration", f"code={train}")
    assert code == 0, err
    fam = arch.FAMILIES[family]
    count = arch.dimensions(fam, config_of(source))["experts"]
    assert arch.dimensions(fam, config_of(out))["experts"] == count + 1
    assert arch.detect_expert_layout(fam, tensors(out)) == layout.replace("-", "_")
    before, routers_before = experts_of(source)
    after, routers_after = experts_of(out)
    for key, value in before.items():  # every existing expert byte-identical
        assert torch.equal(after[key], value), key
    for layer, weight in routers_before.items():  # every existing router row byte-identical
        assert torch.equal(routers_after[layer][:count], weight), layer
        assert routers_after[layer].shape[0] == count + 1
    dense_tensors, dense_family = tensors(dense), arch.detect_family(config_of(dense))
    for layer in routers_before:  # the new expert is the dense model's FFN, byte for byte
        for role in ("gate", "up", "down"):
            assert torch.equal(after[(role, layer, count)], dense_tensors[dense_family.spec("ffn", role).name(layer)])
    original = tensors(source)  # non-FFN weights are the MoE's
    written = tensors(out)
    for name, value in original.items():
        if name in written and value.dim() < 3 and name not in {fam.router.name(0), fam.router.name(1)}:
            if written[name].shape == value.shape:
                assert torch.equal(written[name], value), name
    shares = top1_share(out, held_out, count)
    assert sum(share > 0.5 for share in shares.values()) > len(shares) / 2, shares
    card = (out / "README.md").read_text()
    assert "add-experts" in card and "code" in card


def test_two_experts_are_appended_in_order(moe, dense_of, tmp_path, run_cli):
    source = moe("mixtral")
    first, second = dense_of(source, "a", seed=1), dense_of(source, "b", seed=2)
    text_a, text_b = domain_tokens(tmp_path / "a.jsonl", 1), domain_tokens(tmp_path / "b.jsonl", 2, 60, 90)
    out = tmp_path / "added"
    code, _, err = run_cli("add-experts", source, out, "--expert", f"a={first}", "--expert", f"b={second}",
                           "--calibration", f"a={text_a}", "--calibration", f"b={text_b}")
    assert code == 0, err
    after, routers = experts_of(out)
    assert arch.dimensions(arch.FAMILIES["mixtral"], config_of(out))["experts"] == 6
    assert torch.equal(after[("down", 1, 5)], tensors(second)["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(after[("down", 1, 4)], tensors(first)["model.layers.1.mlp.down_proj.weight"])
    load_model(out)


def test_refuses_a_dense_model_of_another_family(moe, tmp_path, run_cli, token_file):
    source = moe("mixtral")
    other = save_model(tmp_path / "qwen3", "qwen3")
    code, _, err = run_cli("add-experts", source, tmp_path / "out", "--expert", f"x={other}",
                           "--calibration", f"x={token_file}")
    assert code != 0 and "Qwen3ForCausalLM" in err and "MistralForCausalLM" in err


def test_refuses_a_dense_model_of_other_shapes(moe, tmp_path, run_cli, token_file):
    source = moe("mixtral")
    wide = save_model(tmp_path / "mistral", "mistral")  # intermediate_size 44, the experts' 20
    code, _, err = run_cli("add-experts", source, tmp_path / "out", "--expert", f"x={wide}",
                           "--calibration", f"x={token_file}")
    assert code != 0 and "mlp.gate_proj.weight" in err and "[44," in err and "[20," in err
    assert not (tmp_path / "out").exists()


def test_refuses_an_expert_without_calibration(moe, dense_of, tmp_path, run_cli):
    source = moe("mixtral")
    dense = dense_of(source, "code")
    code, _, err = run_cli("add-experts", source, tmp_path / "out", "--expert", f"code={dense}")
    assert code != 0 and "--calibration code=FILE" in err


def test_api(moe, dense_of, tmp_path):
    import surgery

    source = moe("qwen3_moe")
    dense = dense_of(source, "code")
    text = domain_tokens(tmp_path / "t.jsonl", 1)
    result = surgery.add_experts(source, tmp_path / "out", expert={"code": str(dense)}, calibration={"code": str(text)})
    assert result.plan.details["add_experts"]["added"][0]["index"] == 4
