"""Sliding-window attention survives the config translation, or the source is refused before writing.

What transformers 5 does with the sliding keys (configuration_*.py and modeling_*.py):

- Qwen2 and Qwen3: with ``use_sliding_window`` on, the layers marked ``sliding_attention`` in
  ``layer_types`` slide; absent, layers from ``max_window_layers`` on.
- Qwen2-MoE reads ``layer_types`` too, but derives an absent one differently: the even layers below
  ``max_window_layers``. So a Qwen2 config without ``layer_types`` (as Qwen2 / Qwen2.5 configs on
  the Hub are) must get the source's ``layer_types`` written out.
- Qwen3-MoE has no ``layer_types``: with the switch on, every layer slides. A Qwen3 source where only
  some layers slide cannot be reproduced and is refused.
- Mistral and Mixtral: ``sliding_window``, where not null, applies to every layer (Mistral's
  default is 4096, Mixtral's none).

The first test checks the families' reading against transformers itself: it builds each family's
model and reads, per layer, the attention mask the layer receives. The others upcycle, split and
merge sources whose window (4) is shorter than the sequences compared (12 tokens), so that a layer
sliding where the source's does not (or the reverse) changes the logits.
"""

import json
import warnings

import pytest
import torch
from tiny_models import COMMON, CONFIGS, load_model, logits, sample_ids, save_model

from surgery import families as arch
from surgery.errors import SurgeryError

TOLERANCE = 1e-5
LAYERS = 4
WINDOW = 4
ON = dict(use_sliding_window=True, sliding_window=WINDOW)
ALTERNATE = ["full_attention", "sliding_attention"] * 2

# configs transformers can run for every family; sliding keys a family does not read are ignored by it
READINGS = [
    {},
    dict(ON, max_window_layers=1),
    dict(ON, max_window_layers=3),
    dict(ON, max_window_layers=0),
    dict(ON, max_window_layers=LAYERS),
    dict(use_sliding_window=False, sliding_window=WINDOW, max_window_layers=1),
    dict(sliding_window=WINDOW),
    dict(sliding_window=None),
    dict(ON, layer_types=ALTERNATE),
]


def transformers_windows(family: str, overrides: dict) -> dict[int, int]:
    """{layer: window} of the layers whose attention mask (eager, 80 tokens: longer than every window
    of READINGS and the tiny models) lets the last query see fewer than all tokens, from
    transformers' own model of `family`."""
    import transformers

    config_class, model_class, extra = CONFIGS[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(transformers, config_class)(**{**COMMON, **extra, "num_hidden_layers": LAYERS, **overrides})
    config._attn_implementation = "eager"  # masks are always materialised
    model = getattr(transformers, model_class)(config).eval()
    masks = {}
    for layer, module in enumerate(model.model.layers):
        module.register_forward_pre_hook(
            lambda _m, _args, kwargs, layer=layer: masks.__setitem__(layer, kwargs["attention_mask"]), with_kwargs=True)
    length = 80
    with torch.no_grad():
        model(input_ids=torch.arange(3, 3 + length)[None])
    seen = {layer: int((mask[0, 0, -1] == 0).sum()) if mask.dtype != torch.bool else int(mask[0, 0, -1].sum())
            for layer, mask in masks.items()}
    return {layer: count for layer, count in seen.items() if count < length}


# the windows are read to carry them across a conversion: the families that are converted from or into
CONVERTED = sorted({name for name, family in arch.FAMILIES.items() if family.conversions}
                   | {target for family in arch.FAMILIES.values() for target in family.conversions})


@pytest.mark.parametrize("overrides", READINGS, ids=lambda o: json.dumps(o)[:60])
@pytest.mark.parametrize("family", CONVERTED)
def test_the_families_read_the_sliding_keys_as_transformers_does(family, overrides):
    config = {**COMMON, **CONFIGS[family][2], "num_hidden_layers": LAYERS, **overrides}
    assert arch.layer_windows(arch.FAMILIES[family], config) == transformers_windows(family, overrides)


@pytest.mark.parametrize("family", sorted(name for name, family in arch.FAMILIES.items() if family.sliding))
def test_the_sliding_defaults_are_transformers_defaults(family):
    """Absent keys: what the config class holds when config.json does not name them (too long a window
    for the test above to see)."""
    import transformers

    config_class = getattr(transformers, CONFIGS[family][0])
    for key, value in arch.FAMILIES[family].sliding.defaults.items():
        assert getattr(config_class, key) == value, key


# ------------------------------------------------------------------ sources
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """source(family, drop=(), edit={}, **config) -> a tiny saved dense model with LAYERS layers; `drop`:
    keys removed from its config.json (transformers writes layer_types, Hub configs often lack it),
    `edit`: keys set in it afterwards."""
    built = {}

    def get(family, drop=(), edit=None, **overrides):
        key = (family, tuple(drop), json.dumps(edit, sort_keys=True), json.dumps(overrides, sort_keys=True))
        if key not in built:
            directory = save_model(tmp_path_factory.mktemp(family), family, num_hidden_layers=LAYERS, **overrides)
            path = directory / "config.json"
            config = json.loads(path.read_text())
            for name in drop:
                config.pop(name, None)
            config.update(edit or {})
            path.write_text(json.dumps(config, indent=2))
            built[key] = directory
        return built[key]

    return get


def max_logit_difference(src, out) -> float:
    ids = sample_ids(length=12)  # three windows long
    moe = load_model(out)
    moe.set_experts_implementation("eager")
    return float((logits(load_model(src), ids) - logits(moe, ids)).abs().max())


def config_of(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def upcycle(run_cli, src, out, *extra):
    code, _, err = run_cli("upcycle", src, out, "-n", 4, "-k", 2, *extra)
    assert code == 0, err
    return out


# ------------------------------------------------------------------ qwen2 -> qwen2_moe: translated
@pytest.mark.parametrize("drop", [(), ("layer_types",)], ids=["layer_types-written", "layer_types-absent"])
@pytest.mark.parametrize("max_window_layers, sliding", [(2, [2, 3]), (1, [1, 2, 3]), (0, [0, 1, 2, 3])])
def test_qwen2_sliding_layers_are_the_same_in_qwen2_moe(tmp_path, run_cli, source, drop, max_window_layers, sliding):
    src = source("qwen2", drop=drop, max_window_layers=max_window_layers, **ON)
    out = upcycle(run_cli, src, tmp_path / "out")
    config = config_of(out)
    assert config["use_sliding_window"] is True and config["sliding_window"] == WINDOW
    assert [i for i, kind in enumerate(config["layer_types"]) if kind == "sliding_attention"] == sliding
    assert max_logit_difference(src, out) <= TOLERANCE


def test_qwen2_moe_of_a_qwen2_without_layer_types_would_slide_other_layers(source):
    """Why the translation writes layer_types: the carried keys alone make Qwen2-MoE slide layer 0, not 2-3."""
    config = config_of(source("qwen2", drop=("layer_types",), max_window_layers=2, **ON))
    assert arch.layer_windows(arch.FAMILIES["qwen2"], config) == {2: WINDOW, 3: WINDOW}
    assert arch.layer_windows(arch.FAMILIES["qwen2_moe"], config) == {0: WINDOW}


# ------------------------------------------------------------------ qwen3 -> qwen3_moe: all, none, or refused
QWEN3_REFUSAL = ("layers 2-3 of 4 attend through a sliding window of 4 and layers 0-1 attend fully, but qwen3_moe "
                 "applies one sliding window to every layer or to none, so the result could not reproduce the source")


@pytest.mark.parametrize("drop, cause", [
    (("layer_types",), "use_sliding_window is true and max_window_layers is 2, so"),
    ((), "layer_types says"),
], ids=["layer_types-absent", "layer_types-written"])
def test_qwen3_with_only_some_layers_sliding_is_refused_before_writing(tmp_path, run_cli, source, drop, cause):
    src = source("qwen3", drop=drop, max_window_layers=2, **ON)
    code, _, err = run_cli("upcycle", src, tmp_path / "out", "-n", 4, "-k", 2)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("surgery")]  # (building the source printed too)
    assert lines == [f"surgery: error: {src / 'config.json'}: {cause} {QWEN3_REFUSAL}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("drop", [(), ("layer_types",)], ids=["layer_types-written", "layer_types-absent"])
def test_qwen3_with_every_layer_sliding_becomes_qwen3_moe_sliding_every_layer(tmp_path, run_cli, source, drop):
    src = source("qwen3", drop=drop, max_window_layers=0, **ON)
    out = upcycle(run_cli, src, tmp_path / "out")
    config = config_of(out)
    assert config["use_sliding_window"] is True and config["sliding_window"] == WINDOW
    assert max_logit_difference(src, out) <= TOLERANCE


def test_qwen3_with_the_switch_on_but_no_layer_sliding_becomes_qwen3_moe_without_a_window(tmp_path, run_cli, source):
    src = source("qwen3", drop=("layer_types",), max_window_layers=LAYERS, **ON)
    out = upcycle(run_cli, src, tmp_path / "out")
    assert config_of(out)["use_sliding_window"] is False
    assert max_logit_difference(src, out) <= TOLERANCE


# ------------------------------------------------------------------ a window the switch turns off: as before
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_window_with_use_sliding_window_false_upcycles_exactly_and_is_carried_verbatim(tmp_path, run_cli, source,
                                                                                         family):
    # as Hub configs often are (a window with the switch off); transformers itself saves null here
    src = source(family, drop=("layer_types",), edit={"sliding_window": WINDOW}, max_window_layers=1)
    assert config_of(src)["use_sliding_window"] is False and config_of(src)["sliding_window"] == WINDOW
    out = upcycle(run_cli, src, tmp_path / "out")
    config = config_of(out)
    assert (config["use_sliding_window"], config["sliding_window"], config["max_window_layers"]) == (False, WINDOW, 1)
    assert "layer_types" not in config  # nothing rewritten: the target reads the carried keys as the source does
    assert max_logit_difference(src, out) <= TOLERANCE


# ------------------------------------------------------------------ split and merge build the config the same way
def test_split_of_a_sliding_qwen2_at_k_equals_n_with_a_zero_router_is_exact(tmp_path, run_cli, source):
    src = source("qwen2", drop=("layer_types",), max_window_layers=2, **ON)
    code, _, err = run_cli("split", src, tmp_path / "out", "-n", 4, "-k", 4, "--strategy", "random",
                           "--router-init", "zero")
    assert code == 0, err
    assert config_of(tmp_path / "out")["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert max_logit_difference(src, tmp_path / "out") <= TOLERANCE


def test_merge_of_copies_of_a_sliding_qwen2_is_exact(tmp_path, run_cli, source):
    src = source("qwen2", drop=("layer_types",), max_window_layers=2, **ON)
    code, _, err = run_cli("merge", tmp_path / "out", "--expert", f"x={src}", "--expert", f"y={src}",
                           "--router-init", "normal")
    assert code == 0, err
    assert config_of(tmp_path / "out")["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert max_logit_difference(src, tmp_path / "out") <= TOLERANCE


@pytest.mark.parametrize("command", ["split", "merge"])
def test_split_and_merge_refuse_a_qwen3_with_only_some_layers_sliding(tmp_path, run_cli, source, command):
    src = source("qwen3", drop=("layer_types",), max_window_layers=2, **ON)
    args = (["split", src, tmp_path / "out", "-n", 4, "-k", 4, "--strategy", "random", "--router-init", "zero"]
            if command == "split" else
            ["merge", tmp_path / "out", "--expert", f"x={src}", "--expert", f"y={src}", "--router-init", "normal"])
    code, _, err = run_cli(*args)
    assert code == 2 and QWEN3_REFUSAL in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the translation, config by config
def translate(family: str, source: dict, target: str = "auto") -> dict:
    dense = arch.FAMILIES[family]
    config = {"num_hidden_layers": LAYERS, "intermediate_size": 44, **source}
    return arch.moe_config(dense, config, arch.moe_target(dense, target, config), num_experts=4, top_k=2,
                           expert_ffn=44)


def test_a_mistral_config_without_sliding_window_gets_transformers_default_window_in_mixtral():
    assert translate("mistral", {})["sliding_window"] == 4096  # Mixtral's own default would be no window
    assert translate("mistral", {"sliding_window": None})["sliding_window"] is None
    assert translate("mistral", {"sliding_window": 64})["sliding_window"] == 64


@pytest.mark.parametrize("target", ["mixtral", "qwen2_moe"])
def test_sliding_keys_llama_ignores_give_no_window_in_the_moe(target):
    stray = {"sliding_window": 8, "use_sliding_window": True, "layer_types": ["sliding_attention"] * LAYERS}
    config = translate("llama", stray, target)
    assert arch.layer_windows(arch.FAMILIES[target], config) == {}


def test_a_sliding_layer_without_a_window_in_effect_is_refused():
    config = {"num_hidden_layers": LAYERS, "use_sliding_window": False, "layer_types": ALTERNATE}
    with pytest.raises(SurgeryError, match="config.json: layer_types makes layers 1, 3 attend through a sliding "
                                           "window, but use_sliding_window is false, so no window is in effect"):
        arch.moe_target(arch.FAMILIES["qwen2"], "auto", config)


def test_layer_types_of_the_wrong_length_are_refused():
    config = {"num_hidden_layers": LAYERS, **ON, "layer_types": ALTERNATE[:3]}
    with pytest.raises(SurgeryError,
                       match=r"layer_types must list one attention kind per layer \(num_hidden_layers 4\)"):
        arch.moe_target(arch.FAMILIES["qwen3"], "auto", config)
