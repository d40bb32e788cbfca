"""The registry: the family modules of this package, found by listing it, and what they declare, assembled.

A family module is any module here other than the machinery (``base``, ``registry``, ``convert``,
``sliding``, ``moe_layers``, ``dense_form``).
It defines ``FAMILY``, a ``Family`` named like the module (the HF ``model_type``). Adding a family is
adding such a module (and its tiny test model in tests/tiny_models.py): no list of families is kept
anywhere else, and the tables below (``CONVERSIONS``, ``DEFAULT_TARGET``, ``TARGET_SETTINGS``) are
read off the families.

Registry order: dense families, then MoE families, each alphabetical. It is the order of
``supported()`` in error messages and of ``moe_formats()`` in the --format choices.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.families.base import Conversion, Family
from surgery.families.nesting import Nesting

MACHINERY = ("base", "registry", "convert", "sliding", "moe_layers", "dense_form", "nesting")


def family_modules() -> list[str]:
    """Names of the family modules, from the package directory."""
    return sorted(module.name for module in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if module.name not in MACHINERY and not module.name.startswith("_"))


def _load() -> tuple[dict[str, Family], dict[str, Nesting]]:
    found, nestings = [], {}
    for module_name in family_modules():
        module = importlib.import_module(f"{__package__}.{module_name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family) or family.name != module_name:
            raise ImportError(f"{__package__}.{module_name} must define FAMILY, a Family named {module_name!r}")
        found.append(family)
        nesting = getattr(module, "NESTING", None)
        if nesting is not None:
            if not isinstance(nesting, Nesting) or nesting.text != module_name:
                raise ImportError(f"{__package__}.{module_name}.NESTING must be a Nesting of {module_name!r}")
            nestings[nesting.architecture] = nesting
    families = {family.name: family for family in sorted(found, key=lambda f: (f.kind != "dense", f.name))}
    return families, nestings


FAMILIES, NESTINGS = _load()  # NESTINGS: wrapper architecture -> the Nesting of the text family inside it
# (dense source, MoE target) -> how the source's config becomes the target's
CONVERSIONS: dict[tuple[str, str], Conversion] = {
    (family.name, target): conversion for family in FAMILIES.values() for target, conversion in family.conversions.items()}
DEFAULT_TARGET: dict[str, str] = {family.name: family.default_target for family in FAMILIES.values() if family.default_target}
TARGET_SETTINGS: dict[str, dict] = {family.name: family.target_settings for family in FAMILIES.values() if family.kind == "moe"}


def moe_formats() -> tuple[str, ...]:
    """The MoE formats a dense model can become (the --format choices besides auto), in registry order: the MoE
    families some dense family converts into (the others are read, pruned and copied, never built)."""
    targets = {target for _, target in CONVERSIONS}
    return tuple(name for name, family in FAMILIES.items() if family.kind == "moe" and name in targets)


def auto_formats() -> str:
    """What ``--format auto`` picks, for help texts: 'llama/mistral -> mixtral, qwen2 -> qwen2_moe, ...'."""
    sources: dict[str, list[str]] = {}
    for source, target in DEFAULT_TARGET.items():
        sources.setdefault(target, []).append(source)
    return ", ".join(f"{'/'.join(names)} -> {target}" for target, names in sources.items())


def supported() -> str:
    return ", ".join(f"{f.architecture} ({f.name})" for f in FAMILIES.values())


def nesting_of(config: dict | None) -> Nesting | None:
    """The nesting of a multimodal checkpoint whose text model a family here reads (by its architecture, else its
    model_type), or None."""
    if not config:
        return None
    architectures = config.get("architectures") or []
    if architectures and architectures[0] in NESTINGS:
        return NESTINGS[architectures[0]]
    return next((n for n in NESTINGS.values() if not architectures and n.model_type == config.get("model_type")), None)


def text_view(config: dict, where: Path | str = "config.json") -> tuple[Nesting | None, dict]:
    """(its nesting, the text model's config) of a checkpoint's config; (None, `config`) where nothing is nested."""
    nesting = nesting_of(config)
    if nesting is None:
        return None, config
    return nesting, nesting.text_config(config, FAMILIES[nesting.text].architecture, where)


def detect_family(config: dict, where: Path | str = "config.json") -> Family:
    architectures = config.get("architectures") or []
    for family in FAMILIES.values():
        if architectures and architectures[0] == family.architecture:
            return family
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    found = architectures[0] if architectures else model_type
    raise SurgeryError(f"{where}: architecture {found!r} is not supported (supported: {supported()})")
