"""Config-only `surgery inspect` of each flagship MoE beside its published parameter counts.

    python3 bench/flagship_sizes.py          # the README's "Sizes before you download" table (markdown)

Each tests/data/flagship/<name>.json is a published config.json (the keys the sizes need); published.json holds
the published total and active counts and the definition each active count uses. Every model is sized from its
config.json alone, in a temporary directory that holds nothing else, exactly as `surgery inspect DIR` does.
Ours: total = every weight transformers' model holds (MTP layers apart; a multimodal model's vision tower added
where the published total counts it); active = total less the routed experts a
token does not use (experts' weights x (1 - top_k / experts)); w/o emb. = active less the input embedding.
tests/test_config_only.py checks the same numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import surgery  # noqa: E402  (the checkout on sys.path)
from surgery.families import detect_family, text_view  # noqa: E402

FLAGSHIPS = REPO / "tests" / "data" / "flagship"
OURS = {"with embedding": "active", "without input embedding": "w/o emb."}


def sizes(name: str) -> dict | None:
    """Config-only inspect of flagship `name`: {family, total, active, without}; None where its family is absent."""
    config = json.loads((FLAGSHIPS / f"{name}.json").read_text())
    try:
        detect_family(text_view(config)[1])
    except surgery.SurgeryError:  # a family not (yet) in surgery/families
        return None
    with tempfile.TemporaryDirectory(prefix="flagship-") as directory:
        shutil.copy(FLAGSHIPS / f"{name}.json", Path(directory) / "config.json")
        report = surgery.inspect(directory)
    return {"family": report.family, "total": report.parameters, "active": report.active_parameters,
            "without": report.active_parameters_without_embedding, "mtp_layers": report.mtp_layers,
            "towers": report.nested["carried_parameters"] if report.nested else 0}


def billions(value: float) -> str:
    """A count in billions as published (1.04T, 116.83B), or ours to 2 decimals (`value` an int of parameters)."""
    if isinstance(value, int) and value > 10**6:
        return f"{value / 1e12:.3f}T" if value >= 10**12 else f"{value / 1e9:.2f}B"
    return f"{value / 1e3:g}T" if value >= 1000 else f"{value:g}B"


def off(ours: int, published_b: float) -> str:
    share = (ours / 1e9 - published_b) / published_b * 100
    return f"{share:+.1f} %" if abs(share) >= 0.05 else "0.0 %"


def definition(entry: dict) -> str:
    """The published active count's definition, marked where we inferred it from its digits (published.json)."""
    inferred = entry["definition_source"].startswith("inferred")
    return entry["active_definition"] + (", inferred" if inferred else "")


def table() -> list[str]:
    published = json.loads((FLAGSHIPS / "published.json").read_text())["models"]
    lines = ["| family | model | published total | ours (vs published) | published active (definition) | ours active "
             "| ours w/o embedding |", "|---|---|---|---|---|---|---|"]
    for name, entry in published.items():
        found = sizes(name)
        if found is None:
            lines.append(f"| | {entry['model']} | {billions(entry['total_b'])} | (family not in surgery/families) "
                         f"| | | |")
            continue
        compared = OURS.get(entry["active_definition"])
        active, without = billions(found["active"]), billions(found["without"])
        if compared == "active":
            active += f" ({off(found['active'], entry['active_b'])})"
        elif compared == "w/o emb.":
            without += f" ({off(found['without'], entry['active_b'])})"
        if entry.get("total_includes_towers"):  # text model + the vision tower it nests beside
            both = found["total"] + found["towers"]
            total = (f"{billions(both)} ({off(both, entry['total_b'])}): {billions(found['total'])} text + "
                     f"{billions(found['towers'])} vision")
        else:
            total = f"{billions(found['total'])} ({off(found['total'], entry['total_b'])})"
        if found["mtp_layers"]:
            total += f" + {found['mtp_layers']} MTP layer{'s' if found['mtp_layers'] > 1 else ''}"
        lines.append(f"| {found['family']} | {entry['model']} | {billions(entry['total_b'])} | {total} | "
                     f"{billions(entry['active_b'])} ({definition(entry)}) | {active} | {without} |")
    return lines


def main() -> int:
    print("\n".join(table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
