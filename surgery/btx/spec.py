"""What a merge is asked to do: ``MergeSpec``, from command-line options or a YAML file.

Two YAML dialects are read:

* ours, with the command line's fields::

    experts:
      - {name: code, path: ./code, weight: 1.0, calibration: code.txt}
      - {name: prose, path: ./prose, calibration: prose.txt}
    seed: ./seed                 # or {path: ./seed, weight: 0.5, calibration: mixed.txt}
    include_seed: false
    non_ffn: auto                # auto | average | regmean | regmean++ | seed | an expert's name
    top_k: 2
    format: auto                 # auto or an MoE format (the --format choices)
    router_init: calibrated      # auto | zero | normal | embedding | calibrated
    head_fit: auto               # refit the RegMean++ head to the experts' next-token distributions: auto | true | false
    dtype: bf16                  # optional; default: the inputs' dtype

  (``weights: {code: 2}`` and ``calibration: {code: code.txt}`` may also be given as maps);

* a mergekit-moe config (``base_model``, ``experts`` with ``source_model`` and
  ``positive_prompts`` ...), read by ``surgery.btx.mergekit`` onto the same fields: every key
  mergekit-moe reads is honoured with its meaning or refused, and each difference is noted.

Relative paths in a YAML file are resolved against the directory of that file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.execution.routers import registry as router_registry
from surgery.io.data_files import TOKEN_FILE_SUFFIXES, read_text, read_token_ids
from surgery.operations.options import FORMATS, parse_pairs

ROUTER_INITS = router_registry.offered(  # --router-init
    "auto", "zero", "normal", "embedding", "calibrated",
    auto="calibrated when every expert has --calibration text, else normal (a zero router ties every logit)",
    calibrated="fitted layer by layer at the merged model's router input, by --router-fit")
ROUTER_FITS = router_registry.offered("logistic", "class-mean")  # --router-fit
FITS_DEFAULT = "logistic"
SEED_NAME = "seed"
REGMEAN = ("regmean", "regmean++")  # --non-ffn methods that fit the shared linear layers to calibration inputs

OUR_KEYS = {"experts", "seed", "include_seed", "weights", "non_ffn", "top_k", "format", "router_init", "router_fit",
            "calibration", "head_fit",
            "dtype", "router_seed", "calibration_tokens"}
EXPERT_KEYS = {"name", "path", "weight", "calibration"}


@dataclass
class DomainText:
    """Calibration data of one expert's domain (text, or token-id rows), and where it came from."""

    text: str | None
    source: str  # a file path, or "mergekit positive_prompts (N)"
    ids: list | None = None  # token-id rows (a .npy/.pt/.jsonl file), where `text` is None


@dataclass
class MergeSpec:
    experts: list[tuple[str, str]]  # (name, path) in expert order
    seed: str | None = None
    include_seed: bool = False
    weights: dict[str, float] = field(default_factory=dict)  # name -> averaging weight (default 1)
    non_ffn: str = "auto"  # regmean++ with calibrated routers (every expert has text), else average
    top_k: int = 2
    format: str = "auto"
    router_init: str = "auto"
    router_fit: str = FITS_DEFAULT  # how calibrated routers are fitted
    calibration: dict[str, DomainText] = field(default_factory=dict)
    dtype: str | None = None
    router_seed: int = 0
    calibration_tokens: int = 16384  # per domain, for the embedding and calibrated inits
    notes: list[str] = field(default_factory=list)  # what a mergekit config maps differently
    shared: tuple[str, str] | None = None  # (name, path) of the model whose FFN is the shared expert
    # per model of the merge (expert or shared): N(0, s) added to every weight of its FFN; factor on its down_proj
    noise_scale: dict[str, float] = field(default_factory=dict)
    residual_scale: dict[str, float] = field(default_factory=dict)
    negative: dict[str, DomainText] = field(default_factory=dict)  # text its router row should not prefer
    tokenizer_source: str | None = None  # "base", "union" or a model directory whose tokenizer the output has
    format_choices: tuple[str, ...] = ()  # with format auto: the formats a mergekit architecture names
    origin: object = None  # mergekit_moe.Origin when read from a mergekit-moe config (its notes)
    head_fit: bool | None = None  # refit the RegMean++ head to the experts' next-token distributions
    # (surgery.head_fit); None: auto, decided by the merge (btx_merge.run_merge, head_fit_affordable)

    def names(self) -> list[str]:
        return ([name for name, _ in self.experts] + ([SEED_NAME] if self.seed else [])
                + ([self.shared[0]] if self.shared else []))

    def paths(self) -> list[tuple[str, str]]:
        """(name, path) of every model: the experts in order, the seed, the shared expert's model."""
        return (list(self.experts) + ([(SEED_NAME, self.seed)] if self.seed else [])
                + ([self.shared] if self.shared else []))

    def to_options(self) -> dict:
        """The spec as recorded in the output's metadata (paths and calibration sources, no text)."""
        return {"experts": [[name, str(path)] for name, path in self.experts], "seed": self.seed,
                "include_seed": self.include_seed, "weights": dict(sorted(self.weights.items())),
                "non_ffn": self.non_ffn, "top_k": self.top_k, "format": self.format,
                "router_init": self.router_init, "router_fit": self.router_fit, "router_seed": self.router_seed,
                "dtype": None if self.dtype == "keep" else self.dtype,
                "calibration": {name: c.source for name, c in sorted(self.calibration.items())},
                "calibration_tokens": self.calibration_tokens,
                "shared_expert": None if self.shared is None else [self.shared[0], str(self.shared[1])],
                "noise_scale": dict(sorted(self.noise_scale.items())),
                "residual_scale": dict(sorted(self.residual_scale.items())),
                "negative_calibration": {name: c.source for name, c in sorted(self.negative.items())},
                "tokenizer_source": self.tokenizer_source, "head_fit": self.head_fit}


# ------------------------------------------------------------------ command line
def parse_weights(items) -> dict[str, float]:
    """--weights code=2,prose=1 (repeatable; the API: a dict) -> {'code': 2.0, 'prose': 1.0}."""
    parts = items if isinstance(items, dict) else [part for item in items or () for part in str(item).split(",")
                                                   if part.strip()]
    return {name: weight_number(value, f"--weights {name}") for name, value in parse_pairs(parts, "--weights", "W")}


def weight_number(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SurgeryError(f"{where}: {value!r} is not a number") from None
    if not number >= 0 or number == float("inf"):
        raise SurgeryError(f"{where}: weight must be a finite number >= 0, found {value!r}")
    return number


def read_calibration(path, base: Path | None = None) -> DomainText:
    """An expert's calibration file: text, or token ids (.npy, .pt, .jsonl), read (and refused) at once."""
    path = resolve_path(path, base)
    if path.suffix in TOKEN_FILE_SUFFIXES:
        return DomainText(None, str(path), read_token_ids(path))
    return DomainText(read_text(path), str(path))


def spec_from_options(experts, seed, include_seed, weights, non_ffn, top_k, fmt, router_init, calibration, dtype,
                      router_seed, calibration_tokens, router_fit, head_fit) -> MergeSpec:
    """The spec of command-line options (the API's: dicts where the command line has NAME=VALUE lists)."""
    texts = {name: read_calibration(path) for name, path in parse_pairs(calibration, "--calibration", "FILE")}
    spec = MergeSpec(parse_pairs(experts, "--expert", "PATH"), seed, include_seed, parse_weights(weights), non_ffn,
                     top_k, fmt, router_init, router_fit, texts, dtype, router_seed, calibration_tokens,
                     head_fit=head_fit)
    check_spec(spec)
    return spec


def resolve_path(path, base: Path | None) -> Path:
    path = Path(str(path)).expanduser()
    return path if path.is_absolute() or base is None else base / path


# ------------------------------------------------------------------ our YAML
def unknown_keys(keys, allowed, where: str) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise SurgeryError(f"{where}: unknown key {extra[0]!r} (expected one of {', '.join(sorted(allowed))})")


def from_ours(data: dict, path: Path) -> MergeSpec:
    base = path.parent
    unknown_keys(data, OUR_KEYS, str(path))
    experts, weights, calibration = [], {}, {}
    entries = data.get("experts")
    if not isinstance(entries, list) or not entries:
        raise SurgeryError(f"{path}: 'experts' must be a list of {{name, path}} entries")
    for number, entry in enumerate(entries):
        where = f"{path}: experts[{number}]"
        if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
            raise SurgeryError(f"{where}: expected a mapping with 'name' and 'path'")
        unknown_keys(entry, EXPERT_KEYS, where)
        name = str(entry["name"])
        experts.append((name, str(resolve_path(entry["path"], base))))
        if "weight" in entry:
            weights[name] = weight_number(entry["weight"], f"{where}.weight")
        if entry.get("calibration"):
            calibration[name] = read_calibration(entry["calibration"], base)
    seed = data.get("seed")
    if isinstance(seed, dict):
        unknown_keys(seed, {"path", "weight", "calibration"}, f"{path}: seed")
        if "weight" in seed:
            weights[SEED_NAME] = weight_number(seed["weight"], f"{path}: seed.weight")
        if seed.get("calibration"):
            calibration[SEED_NAME] = read_calibration(seed["calibration"], base)
        seed = seed.get("path")
    for name, value in (data.get("weights") or {}).items():
        weights[str(name)] = weight_number(value, f"{path}: weights.{name}")
    for name, file in (data.get("calibration") or {}).items():
        calibration[str(name)] = read_calibration(file, base)
    head_fit = data.get("head_fit", "auto")
    if head_fit == "auto":
        head_fit = None
    elif not isinstance(head_fit, bool):
        raise SurgeryError(f"{path}: head_fit: expected auto, true or false, found {head_fit!r}")
    return MergeSpec(experts, str(resolve_path(seed, base)) if seed else None, bool(data.get("include_seed", False)),
                     weights, str(data.get("non_ffn", "auto")), integer(data.get("top_k", 2), f"{path}: top_k"),
                     str(data.get("format", "auto")), str(data.get("router_init", "auto")),
                     str(data.get("router_fit", FITS_DEFAULT)), calibration,
                     data.get("dtype"), integer(data.get("router_seed", 0), f"{path}: router_seed"),
                     integer(data.get("calibration_tokens", 16384), f"{path}: calibration_tokens"), head_fit=head_fit)


def integer(value, where: str) -> int:
    if type(value) is not int:
        raise SurgeryError(f"{where}: expected an integer, found {value!r}")
    return value


# ------------------------------------------------------------------ checks
def check_spec(spec: MergeSpec, where: str = "options") -> None:
    """Option-level checks that need no file: names, weights, choices, top-k."""
    if not spec.experts:
        raise SurgeryError(f"{where}: give at least one --expert NAME=PATH")
    names = [name for name, _ in spec.experts]
    for name in names:
        if name == SEED_NAME:
            raise SurgeryError(f"{where}: expert name {SEED_NAME!r} is reserved for --seed; choose another name")
        if names.count(name) > 1:
            raise SurgeryError(f"{where}: expert name {name!r} is given twice")
    known = spec.names()
    if spec.shared and spec.shared[0] in names + [SEED_NAME]:
        raise SurgeryError(f"{where}: the shared expert's name {spec.shared[0]!r} is also an expert's or the seed's")
    for option, keys in (("--weights", spec.weights), ("--calibration", spec.calibration),
                         ("noise_scale", spec.noise_scale), ("residual_scale", spec.residual_scale),
                         ("negative prompts", spec.negative)):
        for name in keys:
            if name not in known:
                raise SurgeryError(f"{where}: {option} names {name!r}, which is not a model of this merge "
                                   f"(models: {', '.join(known)})")
    if spec.weights and sum(spec.weights.get(name, 1.0) for name in known) <= 0:
        raise SurgeryError(f"{where}: --weights add up to 0; at least one model needs a positive weight")
    if spec.include_seed and not spec.seed:
        raise SurgeryError(f"{where}: --include-seed needs --seed PATH")
    if spec.non_ffn not in (*REGMEAN, "auto", "average", SEED_NAME) and spec.non_ffn not in names:
        raise SurgeryError(f"{where}: --non-ffn {spec.non_ffn!r}: expected auto, average, regmean, regmean++, seed or "
                           f"an expert name ({', '.join(names)})")
    if spec.non_ffn == "regmean++" and spec.router_init not in ("calibrated", "auto"):
        raise SurgeryError(f"{where}: --non-ffn regmean++ takes its inputs from the merged model as it runs with its "
                           f"fitted routers; it needs --router-init calibrated (got {spec.router_init})")
    missing = [name for name in names if name not in spec.calibration]
    if spec.non_ffn in REGMEAN and missing:
        raise SurgeryError(f"{where}: --non-ffn {spec.non_ffn} fits the shared layers to each expert's own inputs and "
                           f"needs --calibration text for every expert (missing: {', '.join(missing)})")
    if spec.non_ffn == SEED_NAME and not spec.seed:
        raise SurgeryError(f"{where}: --non-ffn seed needs --seed PATH")
    if spec.router_init not in ROUTER_INITS.names:
        raise SurgeryError(f"{where}: router init {spec.router_init!r} is not one of {', '.join(ROUTER_INITS.names)}")
    if spec.router_fit not in ROUTER_FITS.names:
        raise SurgeryError(f"{where}: router fit {spec.router_fit!r} is not one of {', '.join(ROUTER_FITS.names)}")
    if spec.format not in FORMATS:
        raise SurgeryError(f"{where}: format {spec.format!r} is not one of {', '.join(FORMATS)}")
    experts = len(spec.experts) + (1 if spec.include_seed else 0)
    if not 1 <= spec.top_k <= experts:
        option = "experts_per_token" if spec.origin else "--top-k"
        raise SurgeryError(f"{where}: {option} {spec.top_k}: must be between 1 and the number of experts ({experts})")
    if spec.calibration_tokens <= 0:
        raise SurgeryError(f"{where}: calibration_tokens must be positive, found {spec.calibration_tokens}")
