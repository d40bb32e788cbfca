"""`surgery merge --head-fit`: the RegMean++ head refitted to each expert's next-token distributions."""

import json

import pytest
import torch
from safetensors.torch import load_file

from surgery.head_fit import Domain, _Buffers, _kl, fit_head
from test_merge import TEXTS, save_member
from test_regmean import models  # noqa: F401  (two llama experts a, b and their texts)
from tiny_models import load_model


def domain(tokens=40, hidden=6, vocab=11, seed=0, same_as=None):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(tokens, hidden, generator=generator)
    return Domain(features, features.clone(), same_as if same_as is not None else torch.randn(vocab, hidden,
                                                                                              generator=generator))


def test_the_gradient_is_that_of_the_mean_kl():
    part = domain()
    head = torch.randn(11, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    buffers = _Buffers(head, 7)  # chunks of 7 tokens: the sums run over several chunks
    logp = torch.log_softmax(part.expert @ part.head.T, -1)
    kl = (logp.exp() * (logp - torch.log_softmax(part.merged @ head.T, -1))).sum(-1).mean()
    kl.backward()
    kl = kl.detach()
    assert torch.allclose(_kl(head.detach(), part, buffers, grad=True), head.grad, atol=1e-6)
    assert abs(_kl(head.detach(), part, buffers, grad=False) - float(kl)) < 1e-5


def test_a_head_that_already_gives_the_experts_distributions_is_kept():
    start = torch.randn(11, 6, generator=torch.Generator().manual_seed(2))
    fit = fit_head(start, [domain(seed=3, same_as=start), domain(seed=4, same_as=start)])
    assert fit.step == 0 and fit.start_kl < 1e-6
    assert torch.equal(fit.head, start)


def test_the_fit_finds_a_head_both_experts_agree_on_from_tokens_it_never_saw():
    """Both domains' targets come from one head: the fit, started at zero, gets close to it on held-back tokens."""
    target = torch.randn(11, 6, generator=torch.Generator().manual_seed(7))
    fit = fit_head(torch.zeros(11, 6), [domain(tokens=400, seed=5, same_as=target),
                                        domain(tokens=400, seed=6, same_as=target)])
    assert fit.step > 0 and fit.kl < 0.05 * fit.start_kl


def args(models, *more):
    return ["--expert", f"a={models['a']}", "--expert", f"b={models['b']}", "--calibration", f"a={models['a.txt']}",
            "--calibration", f"b={models['b.txt']}", *more]


def kl_to_experts(merged, models) -> float:
    """Mean over the two experts of KL(expert || merged) on the expert's own calibration text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["a"])
    total = 0.0
    for name in ("a", "b"):
        ids = torch.tensor([tokenizer(TEXTS[name][:300])["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(load_model(models[name])(input_ids=ids).logits, -1)
            logq = torch.log_softmax(merged(input_ids=ids).logits, -1)
        total += float((logp.exp() * (logp - logq)).sum(-1).mean()) / 2
    return total


def test_only_the_head_changes_and_it_gives_the_experts_distributions_more_closely(tmp_path, run_cli, models):
    assert run_cli("merge", tmp_path / "plain", *args(models))[0] == 0  # the default: regmean++
    code, _, err = run_cli("merge", tmp_path / "fitted", *args(models, "--head-fit"))
    assert code == 0, err
    assert "head fit: KL to the experts on held-back calibration tokens" in err
    plain, fitted = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "fitted"))
    assert sorted(plain) == sorted(fitted)
    assert [name for name in plain if not torch.equal(plain[name], fitted[name])] == ["lm_head.weight"]
    assert kl_to_experts(load_model(tmp_path / "fitted"), models) < kl_to_experts(load_model(tmp_path / "plain"),
                                                                                  models)


def test_head_fit_needs_a_regmean_plus_plus_merge(tmp_path, run_cli, models):
    code, _, err = run_cli("merge", tmp_path / "out", *args(models, "--head-fit", "--non-ffn", "average"))
    assert code == 2 and err.count("\n") == 1
    assert "--head-fit refits the head of a RegMean++ merge, and this merge's --non-ffn is average" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    paths = {name: save_member(root / name, seed=seed, tie_word_embeddings=True) for seed, name in enumerate("ab")}
    for name in ("a", "b"):
        (root / f"{name}.txt").write_text(TEXTS[name])
        paths[f"{name}.txt"] = root / f"{name}.txt"
    return paths


def test_head_fit_refuses_a_head_tied_to_the_embedding(tmp_path, run_cli, tied):
    code, _, err = run_cli("merge", tmp_path / "out", *args(tied, "--head-fit"))
    assert code == 2 and "ties its head to the embedding" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_head_fit_refuses_a_head_copied_from_the_one_model_averaged(tmp_path, run_cli, models):
    code, _, err = run_cli("merge", tmp_path / "out", *args(models, "--head-fit", "--weights", "b=0"))
    assert code == 2 and "only one model's non-FFN weights are averaged here" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_yaml_key_head_fit_takes_true_or_false(tmp_path, run_cli, models):
    text = (f"experts:\n  - {{name: a, path: {models['a']}, calibration: {models['a.txt']}}}\n"
            f"  - {{name: b, path: {models['b']}, calibration: {models['b.txt']}}}\n")
    (tmp_path / "bad.yml").write_text(text + "head_fit: sometimes\n")
    code, _, err = run_cli("merge", tmp_path / "out", "--config", tmp_path / "bad.yml")
    assert code == 2 and "head_fit: expected true or false, found 'sometimes'" in err
    (tmp_path / "good.yml").write_text(text + "head_fit: true\n")
    code, out, err = run_cli("merge", tmp_path / "out", "--config", tmp_path / "good.yml", "--dry-run", "--json")
    assert code == 0, err
    recipes = {t["name"]: t["recipe"] for t in json.loads(out)["tensors"]}
    assert recipes["lm_head.weight"].endswith("then refitted to the experts' next-token distributions (--head-fit)")
    assert "--head-fit" not in recipes["model.layers.0.self_attn.q_proj.weight"]


def test_the_python_api_takes_head_fit(tmp_path, run_cli, models):
    import surgery

    surgery.merge(tmp_path / "api", {"a": models["a"], "b": models["b"]}, head_fit=True,
                  calibration={"a": models["a.txt"], "b": models["b.txt"]})
    assert run_cli("merge", tmp_path / "cli", *args(models, "--head-fit"))[0] == 0
    api, cli = (load_file(tmp_path / name / "model.safetensors") for name in ("api", "cli"))
    assert torch.equal(api["lm_head.weight"], cli["lm_head.weight"])
