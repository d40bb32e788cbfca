"""`surgery merge --head-fit`: the RegMean++ head refitted to each expert's next-token distributions."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_merge import TEXTS, save_member
from test_regmean import models  # noqa: F401  (two llama experts a, b and their texts)
from tiny_models import load_model

import surgery.btx.head_fit
from surgery.btx.head_fit import Domain, _Buffers, _kl, fit_head


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


def test_domains_larger_than_a_minibatch_are_fitted_on_seeded_draws(monkeypatch):
    """Minibatches of 50 of 400 tokens: the same seed gives the same head, another seed another head, and
    both get close to the head behind the targets."""
    monkeypatch.setattr(surgery.btx.head_fit, "BATCH_TOKENS", 50)
    target = torch.randn(11, 6, generator=torch.Generator().manual_seed(7))
    domains = [domain(tokens=400, seed=5, same_as=target), domain(tokens=400, seed=6, same_as=target)]
    first, again, other = (fit_head(torch.zeros(11, 6), domains, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(first.head, again.head) and not torch.equal(first.head, other.head)
    assert first.kl < 0.05 * first.start_kl and other.kl < 0.05 * other.start_kl


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
    assert run_cli("merge", tmp_path / "plain", *args(models, "--no-head-fit"))[0] == 0  # regmean++ alone
    code, _, err = run_cli("merge", tmp_path / "fitted", *args(models, "--head-fit"))
    assert code == 0, err
    assert "head fit: KL to the experts on held-back calibration tokens" in err
    plain, fitted = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "fitted"))
    assert sorted(plain) == sorted(fitted)
    assert [name for name in plain if not torch.equal(plain[name], fitted[name])] == ["lm_head.weight"]
    assert kl_to_experts(load_model(tmp_path / "fitted"), models) < kl_to_experts(load_model(tmp_path / "plain"),
                                                                                  models)


def test_auto_fits_the_head_when_the_fit_is_cheap(tmp_path, run_cli, models):
    code, _, err = run_cli("merge", tmp_path / "auto", *args(models))
    assert code == 0 and "head fit: KL to the experts on held-back calibration tokens" in err
    assert run_cli("merge", tmp_path / "fitted", *args(models, "--head-fit"))[0] == 0
    auto, fitted = (load_file(tmp_path / name / "model.safetensors") for name in ("auto", "fitted"))
    assert all(torch.equal(auto[name], fitted[name]) for name in fitted)


def test_auto_skips_a_costly_head_fit_and_says_how_to_run_it(tmp_path, run_cli, models, monkeypatch):
    monkeypatch.setattr(surgery.btx.head_fit, "AUTO_PRODUCTS", {"cpu": 1000, "cuda": 2000})
    code, _, err = run_cli("merge", tmp_path / "auto", *args(models, "--device", "cpu"))
    assert code == 0 and "head fit skipped (auto): 800 steps of 3 x 2 x 2048 tokens x" in err
    assert "above what it runs by itself on cpu (1e+03 on a CPU, 2e+03 on a GPU); --head-fit runs it" in err
    assert "KL to the experts" not in err
    code, _, err = run_cli("merge", tmp_path / "plain", *args(models, "--no-head-fit"))
    assert code == 0 and "head fit" not in err
    auto, plain = (load_file(tmp_path / name / "model.safetensors") for name in ("auto", "plain"))
    assert all(torch.equal(auto[name], plain[name]) for name in plain)


def test_auto_decides_by_the_device_kind_and_on_a_gpu_by_its_free_memory():
    from surgery.btx.head_fit import auto_skip_reason, planned_bytes

    world = dict(vocab=1024, hidden=128, domains=3, tokens=16384)  # the BTX world: 1.9e12 multiply-adds
    seven_b = dict(vocab=32000, hidden=4096, domains=3, tokens=16384)  # 1.9e15
    assert auto_skip_reason(**world, device="cpu") is None
    assert auto_skip_reason(**world, device="cuda:0", free_gpu_bytes=80 * 2**30) is None
    assert "above what it runs by itself on cpu" in auto_skip_reason(**seven_b, device="cpu")
    needed = planned_bytes(**seven_b)
    assert needed == 4 * (8 * 32000 * 4096 + 2 * 3 * 16384 * 4096 + 3 * 2**24)
    assert auto_skip_reason(**seven_b, device="cuda:1", free_gpu_bytes=80 * 2**30) is None
    assert "needing about 6.01 GB of cuda:1's 4.29 GB free" in auto_skip_reason(**seven_b, device="cuda:1",
                                                                           free_gpu_bytes=4 * 2**30)


def test_auto_leaves_a_merge_without_a_regmean_head_alone(tmp_path, run_cli, models, tied):
    for name, extra in (("average", ("--non-ffn", "average")), ("one", ("--weights", "b=0"))):
        code, _, err = run_cli("merge", tmp_path / name, *args(models, *extra))
        assert code == 0 and "head fit" not in err, err
    code, _, err = run_cli("merge", tmp_path / "tied", *args(tied))
    assert code == 0 and "head fit" not in err, err


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


def test_the_yaml_key_head_fit_takes_auto_true_or_false(tmp_path, run_cli, models):
    text = (f"experts:\n  - {{name: a, path: {models['a']}, calibration: {models['a.txt']}}}\n"
            f"  - {{name: b, path: {models['b']}, calibration: {models['b.txt']}}}\n")
    (tmp_path / "bad.yml").write_text(text + "head_fit: sometimes\n")
    code, _, err = run_cli("merge", tmp_path / "out", "--config", tmp_path / "bad.yml")
    assert code == 2 and "head_fit: expected auto, true or false, found 'sometimes'" in err
    (tmp_path / "good.yml").write_text(text + "head_fit: true\n")
    code, out, err = run_cli("merge", tmp_path / "out", "--config", tmp_path / "good.yml", "--dry-run", "--json")
    assert code == 0, err
    recipes = {t["name"]: t["recipe"] for t in json.loads(out)["tensors"]}
    assert recipes["lm_head.weight"].endswith("then refitted to the experts' next-token distributions (--head-fit)")
    assert "--head-fit" not in recipes["model.layers.0.self_attn.q_proj.weight"]
    (tmp_path / "off.yml").write_text(text + "head_fit: false\n")
    for config, flags in (("off.yml", ()), ("good.yml", ("--no-head-fit",))):  # the command line wins over the file
        code, out, err = run_cli("merge", tmp_path / "out", "--config", tmp_path / config, *flags, "--dry-run", "--json")
        assert code == 0, err
        assert "--head-fit" not in {t["name"]: t["recipe"] for t in json.loads(out)["tensors"]}["lm_head.weight"]


def test_the_python_api_takes_head_fit(tmp_path, run_cli, models):
    import surgery

    surgery.merge(tmp_path / "api", {"a": models["a"], "b": models["b"]}, head_fit=True,
                  calibration={"a": models["a.txt"], "b": models["b.txt"]})
    assert run_cli("merge", tmp_path / "cli", *args(models, "--head-fit"))[0] == 0
    api, cli = (load_file(tmp_path / name / "model.safetensors") for name in ("api", "cli"))
    assert torch.equal(api["lm_head.weight"], cli["lm_head.weight"])
