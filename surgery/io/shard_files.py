"""The files of a checkpoint opened from their headers: one safetensors file, shards listed by an index (every entry
checked: no path outside the directory, no shard missing, no tensor in two shards or unlisted), or unindexed
shards; and the JSON files users give (config, index).
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.safetensors_format import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path):
    """A JSON file the user gave us (config, index, manifest); invalid JSON is a one-line error."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SurgeryError(f"{path}: not valid JSON ({str(exc)[:80]})") from None


def read_config(path: Path, required: bool) -> dict | None:
    if not path.exists():
        if required:
            raise SurgeryError(f"{path}: no such file (operations need the model's config)")
        return None
    config = read_json(path)
    if not isinstance(config, dict):
        raise SurgeryError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def open_single(file: Path):
    header = read_header(file)
    return [file], dict(header.tensors), None, {file: header.metadata}


def open_unindexed(files: list[Path]):
    tensors: dict[str, TensorInfo] = {}
    metadata = {}
    for file in files:
        header = read_header(file)
        metadata[file] = header.metadata
        for name, info in header.tensors.items():
            if name in tensors:
                raise SurgeryError(f"{file.parent}: tensor {name!r} is stored in two shards, {tensors[name].file.name} "
                                  f"and {file.name} (expected exactly one)")
            tensors[name] = info
    return files, tensors, None, metadata


def open_indexed(index_path: Path):
    directory = index_path.parent
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SurgeryError(f"{index_path}: expected an object with a 'weight_map' of tensor name -> shard file")
    root = directory.resolve()
    shard_names: list[str] = []
    for name, shard in weight_map.items():
        if not shard or "\x00" in shard:
            raise SurgeryError(f"{index_path}: tensor {name!r} points to shard {shard!r}, which is not a valid file name")
        candidate = Path(shard)
        if candidate.is_absolute() or ".." in candidate.parts or not (root / candidate).resolve().is_relative_to(root):
            raise SurgeryError(f"{index_path}: tensor {name!r} points to shard {shard!r} outside the checkpoint directory (refused)")
        if shard not in shard_names:
            shard_names.append(shard)
    for shard in shard_names:
        if not (directory / shard).is_file():
            listed = next(name for name, s in weight_map.items() if s == shard)
            raise SurgeryError(f"{index_path}: shard {shard!r} (listed for tensor {listed!r}) is missing from {directory}")
    tensors: dict[str, TensorInfo] = {}
    metadata = {}
    files = []
    for shard in sorted(shard_names):
        file = directory / shard
        files.append(file)
        header = read_header(file)
        metadata[file] = header.metadata
        for name, info in header.tensors.items():
            if name in tensors:
                raise SurgeryError(f"{index_path}: tensor {name!r} is stored in two shards, {tensors[name].file.name} "
                                  f"and {file.name} (expected exactly one)")
            listed = weight_map.get(name)
            if listed is None:
                raise SurgeryError(f"{file}: tensor {name!r} is in the shard but not in {index_path.name}")
            if listed != shard:
                raise SurgeryError(f"{index_path}: tensor {name!r} is listed in {listed!r} but found in {shard!r}")
            tensors[name] = info
    for name, shard in weight_map.items():
        if name not in tensors:
            raise SurgeryError(f"{directory / shard}: tensor {name!r} is listed in {index_path.name} but absent from the shard")
    ordered = {name: tensors[name] for name in weight_map}
    return files, ordered, index, metadata
