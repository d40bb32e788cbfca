"""`surgery add-experts`: each dense model's FFN as a new routed expert, its router row fitted on its text."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import load_model, logits, sample_ids, save_model, tensors

from surgery import families as arch
from surgery.cli import main
from surgery.execution.routing_stats import router_modules

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


def make_dense(run, moe, out, seed=7, own_non_ffn=False, extract=()):
    """A dense model of the MoE's dense family and shapes (`surgery extract`, through `run`) with a random FFN of its
    own and, with `own_non_ffn`, every other weight moved off the MoE's by noise of half its mean magnitude."""
    code, _, err = run("extract", moe, out, "--expert", 0, *extract)
    assert code == 0, err
    family = arch.detect_family(config_of(out))
    generator = torch.Generator().manual_seed(seed)
    for path in out.glob("*.safetensors"):
        stored = load_file(str(path))
        for key, value in stored.items():
            if any(key == family.spec("ffn", role).name(layer) for role in ("gate", "up", "down")
                   for layer in range(8)):
                stored[key] = torch.randn(value.shape, generator=generator).to(value.dtype) * 0.05
            elif own_non_ffn:
                noise = torch.randn(value.shape, generator=generator) * 0.5 * float(value.float().abs().mean())
                stored[key] = (value.float() + noise).to(value.dtype)
        save_file(stored, str(path), metadata={"format": "pt"})
    return out


@pytest.fixture
def dense_of(tmp_path, run_cli):
    """make(moe, name, seed=7, own_non_ffn=False): ``make_dense`` into tmp_path / name."""
    def make(moe, name, seed=7, own_non_ffn=False):
        return make_dense(run_cli, moe, tmp_path / name, seed, own_non_ffn)
    return make


def router_inputs(directory, token_path):
    """({MoE layer: what its router reads on the text's tokens}, {layer: router weight}), from transformers' own
    model (a pre-hook on each router module)."""
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
    return ({layer: torch.cat([x.reshape(-1, x.shape[-1]) for x in captured[layer]]) for layer in routers},
            {layer: module.weight.detach() for layer, module in routers.items()})


def top1_share(directory, token_path, index):
    """{MoE layer: share of the text's tokens whose highest router logit is expert `index`}."""
    inputs, weights = router_inputs(directory, token_path)
    return {layer: float(((inputs[layer] @ weights[layer].T).argmax(dim=-1) == index).float().mean())
            for layer in inputs}


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


def dense_ffn(directory, role, layer):
    """A dense checkpoint's FFN tensor of `role`, a role stored fused (Phi-3's gate_up_proj) as its rows."""
    config = config_of(directory)
    family = arch.detect_family(config)
    name = family.spec("ffn", role).name(layer)
    stored, start, stop = arch.source_views(family, config).get(name, (name, None, None))
    return tensors(directory)[stored][start:stop]


@pytest.mark.parametrize("dense_family", ["llama", "phi3"])  # Mixtral's dense family is Mistral; both convert into it
def test_takes_experts_from_every_dense_family_that_converts_into_it(dense_family, tmp_path, run_cli, token_file):
    """A Mixtral upcycled from a dense model takes that model as a new expert. Every expert is then a copy of one FFN
    and Mixtral renormalises its top-k weights, so the output is the dense model's whatever the routing: logits
    within 1e-5 in float32 (the weighted sum of equal outputs, weights summing to 1, rounds)."""
    assert (dense_family, "mixtral") in arch.CONVERSIONS
    dense = save_model(tmp_path / dense_family, dense_family, intermediate_size=20)
    source = tmp_path / "upcycled"
    code, _, err = run_cli("upcycle", dense, source, "--num-experts", 2, "--top-k", 2)
    assert code == 0, err
    out = tmp_path / "added"
    code, _, err = run_cli("add-experts", source, out, "--expert", f"x={dense}", "--calibration", f"x={token_file}")
    assert code == 0, err
    assert arch.detect_family(config_of(out)).name == "mixtral"
    after, _ = experts_of(out)
    for layer in range(2):
        for role in ("gate", "up", "down"):
            assert torch.equal(after[(role, layer, 2)], dense_ffn(dense, role, layer)), (role, layer)
    ids = sample_ids()
    assert torch.allclose(logits(load_model(out), ids), logits(load_model(dense), ids), rtol=0, atol=1e-5)


def test_refuses_a_dense_model_of_another_family(moe, tmp_path, run_cli, token_file):
    other = save_model(tmp_path / "qwen3", "qwen3")
    source = moe("mixtral")  # after save_model: its progress output is not in err
    code, _, err = run_cli("add-experts", source, tmp_path / "out", "--expert", f"x={other}",
                           "--calibration", f"x={token_file}")
    accepted = " or ".join(arch.FAMILIES[name].architecture for name, target in arch.CONVERSIONS if target == "mixtral")
    assert code == 2 and err.count("\n") == 1 and "Qwen3ForCausalLM" in err
    assert f"takes experts from {accepted} models" in err and "LlamaForCausalLM" in accepted
    assert not (tmp_path / "out").exists()


def test_refuses_a_dense_model_of_other_shapes(moe, tmp_path, run_cli, token_file):
    source = moe("mixtral")
    wide = save_model(tmp_path / "mistral", "mistral")  # intermediate_size 44, the experts' 20
    code, _, err = run_cli("add-experts", source, tmp_path / "out", "--expert", f"x={wide}",
                           "--calibration", f"x={token_file}")
    assert code != 0 and "mlp.gate_proj.weight" in err and "[44," in err and "[20," in err
    assert not (tmp_path / "out").exists()


def test_refuses_a_dense_model_in_another_dtype(moe, dense_of, tmp_path, run_cli, token_file):
    source = moe("qwen3_moe", layout="fused")
    dense = dense_of(source, "code")
    code, _, err = run_cli("copy", dense, tmp_path / "bf16", "--dtype", "bf16")
    assert code == 0, err
    code, _, err = run_cli("add-experts", source, tmp_path / "out", "--expert", f"x={tmp_path / 'bf16'}",
                           "--calibration", f"x={token_file}")
    assert code != 0 and "mlp.gate_proj.weight" in err and "BF16" in err and "F32" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


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
    added = result.plan.details["add_experts"]["added"][0]
    assert added["index"] == 4 and set(added["wins"]) == {0, 1}  # the wins found on the draft
    assert any("its router row wins" in note for note in result.notes)


# ------------------------------------------------------------------ --non-ffn average
AVERAGE_CASES = [("mixtral", "per-expert"), ("qwen3_moe", "fused"), ("granitemoe", "fused"),
                 ("qwen2_moe", "per-expert")]
EXTRACT = {"qwen2_moe": ("--shared-gate", "drop")}  # a dense model of the routed experts' shapes
NOT_AVERAGED = ("experts", "router", "shared_expert")


def cli(*args):
    """`surgery ARGS...` in-process, without capsys (module-scoped fixtures): (exit code, "", "")."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else 1), "", ""
    return 0, "", ""


def added_with(denses: dict, texts: dict) -> list:
    return [arg for name in denses
            for arg in ("--expert", f"{name}={denses[name]}", "--calibration", f"{name}={texts[name]}")]


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    """build(family, layout, count=2) -> (MOE, {name: dense}, {name: text}, OUT): `count` dense models (a, b) with
    their own FFNs and non-FFN weights added to a tiny MoE with --non-ffn average; each case built once per module."""
    built = {}

    def build(family, layout, count=2):
        if (family, layout, count) not in built:
            root = tmp_path_factory.mktemp(f"average-{family}-{layout}-{count}")
            source = root / "moe"
            assert cli("copy", save_model(root / "hf", family), source, "--layout", layout)[0] == 0
            denses = {name: make_dense(cli, source, root / name, seed, True, EXTRACT.get(family, ()))
                      for name, seed in (("a", 1), ("b", 2))[:count]}
            texts = {"a": domain_tokens(root / "a.jsonl", 1), "b": domain_tokens(root / "b.jsonl", 2, 60, 90)}
            texts = {name: texts[name] for name in denses}
            out = root / "added"
            assert cli("add-experts", source, out, *added_with(denses, texts), "--non-ffn", "average")[0] == 0
            built[(family, layout, count)] = source, denses, texts, out
        return built[(family, layout, count)]
    return build


def non_ffn_names(directory) -> list[str]:
    config = config_of(directory)
    family = arch.detect_family(config)
    return [e.name for e in arch.expected_tensors(family, config).values() if e.group not in NOT_AVERAGED]


@pytest.mark.parametrize("family,layout", AVERAGE_CASES)
def test_average_makes_every_non_ffn_tensor_the_mean_of_the_moe_and_the_dense_models(family, layout, averaged):
    source, denses, _, out = averaged(family, layout)
    written, inputs = tensors(out), [tensors(source)] + [tensors(d) for d in denses.values()]
    names = non_ffn_names(source)
    assert any("attn" in name for name in names) and any("embed" in name for name in names)
    factor = torch.tensor(1 / 3, dtype=torch.float32)
    for name in names:
        mean = sum(stored[name].float() * factor for stored in inputs)
        assert written[name].dtype == inputs[0][name].dtype, name
        assert torch.allclose(written[name].float(), mean, rtol=1e-6, atol=1e-7), name
        assert not torch.equal(written[name], inputs[0][name]), name  # the dense models' weights differ
    details = json.loads(load_file_metadata(out)["surgery_add_experts"])
    assert details["non_ffn"] == "average" and details["non_ffn_mean"]["tensors"] == len(names)
    assert "mean" in (out / "README.md").read_text()


def load_file_metadata(directory):
    from safetensors import safe_open

    path = sorted(directory.glob("*.safetensors"))[0]
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("family,layout", AVERAGE_CASES)
def test_average_keeps_experts_router_rows_and_shared_experts_and_copies_the_new_ffns(family, layout, averaged):
    source, denses, _, out = averaged(family, layout)
    fam = arch.FAMILIES[family]
    count = arch.dimensions(fam, config_of(source))["experts"]
    before, routers_before = experts_of(source)
    after, routers_after = experts_of(out)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    for layer, weight in routers_before.items():
        assert routers_after[layer].shape[0] == count + 2 and torch.equal(routers_after[layer][:count], weight)
    for index, dense in enumerate(denses.values()):
        stored, dense_family = tensors(dense), arch.detect_family(config_of(dense))
        for layer in routers_before:
            for role in ("gate", "up", "down"):
                assert torch.equal(after[(role, layer, count + index)],
                                   stored[dense_family.spec("ffn", role).name(layer)]), (role, layer, index)
    config = config_of(source)
    shared = [e.name for e in arch.expected_tensors(fam, config).values() if e.group == "shared_expert"]
    assert bool(shared) == (family == "qwen2_moe")
    original, written = tensors(source), tensors(out)
    for name in shared:
        assert torch.equal(written[name], original[name]), name


@pytest.mark.parametrize("family,layout", AVERAGE_CASES)
def test_average_output_loads_in_transformers(family, layout, averaged):
    _, _, _, out = averaged(family, layout)
    load_model(out)  # fails on any missing, unexpected or mismatched key


@pytest.mark.parametrize("family,layout", AVERAGE_CASES)
def test_average_new_expert_wins_most_of_its_domains_held_out_tokens(family, layout, averaged, tmp_path):
    source, _, _, out = averaged(family, layout, count=1)  # two new rows compete (docs/add-experts.md)
    count = arch.dimensions(arch.FAMILIES[family], config_of(source))["experts"]
    shares = top1_share(out, domain_tokens(tmp_path / "held.jsonl", 3), count)
    assert sum(share > 0.5 for share in shares.values()) > len(shares) / 2, shares


@pytest.mark.parametrize("family,layout", AVERAGE_CASES)
def test_average_rows_are_fitted_at_the_written_models_router_input(family, layout, averaged):
    """Each new row points along the mean router input of its text in the written (averaged) model: fitted on the
    MoE's own router inputs it would point elsewhere."""
    source, _, texts, out = averaged(family, layout)
    count = arch.dimensions(arch.FAMILIES[family], config_of(source))["experts"]
    for index, text in enumerate(texts.values()):
        inputs, weights = router_inputs(out, text)
        for layer in inputs:
            cosine = torch.nn.functional.cosine_similarity(weights[layer][count + index], inputs[layer].mean(0), dim=0)
            assert cosine > 0.9999, (layer, float(cosine))


def test_keep_is_the_default(moe, dense_of, tmp_path, run_cli):
    import surgery

    source = moe("mixtral")
    dense = dense_of(source, "code", own_non_ffn=True)
    text, out = domain_tokens(tmp_path / "t.jsonl", 1), tmp_path / "added"
    code, _, err = run_cli("add-experts", source, out, "--expert", f"code={dense}", "--calibration", f"code={text}")
    assert code == 0, err
    assert json.loads(load_file_metadata(out)["surgery_add_experts"])["non_ffn"] == "keep"
    written, original = tensors(out), tensors(source)
    for name in non_ffn_names(source):
        assert torch.equal(written[name], original[name]), name
    planned = surgery.add_experts(source, tmp_path / "api", expert={"code": str(dense)}, calibration={"code": str(text)},
                                  dry_run=True)  # the API's default too
    assert planned.plan.details["add_experts"]["non_ffn"] == "keep"


def test_dry_run_reads_no_weights(moe, dense_of, tmp_path, run_cli, monkeypatch):
    from surgery.io.checkpoint import Checkpoint

    source = moe("qwen3_moe", "fused")
    dense = dense_of(source, "code", own_non_ffn=True)
    text, out = domain_tokens(tmp_path / "t.jsonl", 1), tmp_path / "added"

    def refuse(self, file):
        raise AssertionError(f"a dry run read {file}")

    monkeypatch.setattr(Checkpoint, "descriptor", refuse)
    code, stdout, err = run_cli("add-experts", source, out, "--expert", f"code={dense}", "--calibration",
                                f"code={text}", "--non-ffn", "average", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(stdout)
    recipes = {t["name"]: t["recipe"] for t in plan["tensors"]}
    assert recipes["model.layers.0.self_attn.q_proj.weight"].startswith("mean(")
    assert "fitted on the written draft" in recipes["model.layers.0.mlp.gate.weight"]
    assert plan["add_experts"]["non_ffn_mean"]["weight"] == 0.5 and not out.exists()


def test_api_takes_non_ffn(moe, dense_of, tmp_path):
    import surgery
    from surgery.errors import SurgeryError

    source = moe("mixtral")
    dense, text = dense_of(source, "code"), domain_tokens(tmp_path / "t.jsonl", 1)
    planned = surgery.add_experts(source, tmp_path / "out", expert={"code": str(dense)}, calibration={"code": str(text)},
                                  non_ffn="average", dry_run=True)
    assert planned.plan.details["add_experts"]["non_ffn"] == "average"
    assert planned.plan.tensors[0].recipe.describe().startswith("mean(")  # the embedding
    with pytest.raises(SurgeryError, match="--non-ffn 'median': expected one of keep, average"):
        surgery.add_experts(source, tmp_path / "out", expert={"code": str(dense)}, calibration={"code": str(text)},
                            non_ffn="median")


def test_average_refuses_a_dense_model_without_one_of_the_moes_non_ffn_tensors(moe, dense_of, tmp_path, run_cli):
    source = moe("mixtral")
    dense = dense_of(source, "code")
    path = dense / "model.safetensors"
    stored = load_file(str(path))
    del stored["lm_head.weight"]  # a tied head: the dense model has none of its own
    save_file(stored, str(path), metadata={"format": "pt"})
    (dense / "config.json").write_text(json.dumps({**config_of(dense), "tie_word_embeddings": True}))
    text, out = domain_tokens(tmp_path / "t.jsonl", 1), tmp_path / "added"
    code, _, err = run_cli("add-experts", source, out, "--expert", f"code={dense}", "--calibration", f"code={text}",
                           "--non-ffn", "average")
    assert code == 2 and err.count("\n") == 1 and "'lm_head.weight' is missing in code" in err
    assert not out.exists()
