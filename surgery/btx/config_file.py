"""A merge's YAML file, ours or a mergekit-moe config, read into a ``MergeSpec`` (``spec.from_ours`` and
``mergekit.from_mergekit``: which one is told by its keys)."""

from __future__ import annotations

from pathlib import Path

import yaml

from surgery.btx.mergekit import from_mergekit, is_mergekit
from surgery.btx.spec import MergeSpec, check_spec, from_ours
from surgery.errors import SurgeryError


def load_config(path) -> MergeSpec:
    """Our YAML or a mergekit-moe YAML -> MergeSpec."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SurgeryError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SurgeryError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SurgeryError(f"{path}: expected a mapping of merge settings, found {type(data).__name__}")
    spec = from_mergekit(data, path) if is_mergekit(data) else from_ours(data, path)
    check_spec(spec, where=str(path))
    return spec
