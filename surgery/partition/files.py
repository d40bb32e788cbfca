"""Saving and loading a split's neuron assignment (JSON or .npz), checked against the model.

JSON: {"format": "surgery-partition", "version": 1, "strategy", "num_experts", "intermediate_size",
"layers": {"<layer>": {"experts": [[neuron, ...], ...], "shared": [...]}}}. The .npz form holds
the same: a ``meta`` JSON string and integer arrays ``layer<L>_expert<j>`` / ``layer<L>_shared``.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError
from surgery.partition.base import Partition

FORMAT = "surgery-partition"
VERSION = 1


def save(path, partitions: dict[int, Partition], *, strategy: str, ffn: int) -> None:
    path = Path(path)
    meta = {"format": FORMAT, "version": VERSION, "strategy": strategy,
            "num_experts": next(iter(partitions.values())).num_experts, "intermediate_size": ffn}
    try:
        if path.suffix == ".npz":
            _save_npz(path, meta, partitions)
        else:
            layers = {str(layer): {"experts": [e.tolist() for e in p.experts], "shared": p.shared.tolist()}
                      for layer, p in sorted(partitions.items())}
            path.write_text(json.dumps({**meta, "layers": layers}, separators=(",", ":")) + "\n")
    except OSError as exc:
        raise SurgeryError(f"--save-partition {path}: cannot write: {exc.strerror or exc}") from None


def _save_npz(path: Path, meta: dict, partitions: dict[int, Partition]) -> None:
    """An uncompressed .npz with fixed zip timestamps, so equal partitions give equal bytes."""
    arrays = {"meta": np.frombuffer(json.dumps({**meta, "layers": sorted(partitions)}).encode(), dtype=np.uint8)}
    for layer, partition in sorted(partitions.items()):
        for j, expert in enumerate(partition.experts):
            arrays[f"layer{layer}_expert{j}"] = expert
        arrays[f"layer{layer}_shared"] = partition.shared
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, buffer.getvalue())


def load(path) -> tuple[dict, dict[int, Partition]]:
    """(meta, {layer: Partition}) from a file written by `save`; SurgeryError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"--partition {path}: no such file")
    try:
        if path.suffix == ".npz":
            meta, partitions = _load_npz(path)
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
            meta = {k: v for k, v in data.items() if k != "layers"}
            partitions = {int(layer): Partition([np.asarray(e, dtype=np.int64) for e in entry["experts"]],
                                                np.asarray(entry.get("shared", []), dtype=np.int64))
                          for layer, entry in data["layers"].items()}
    except SurgeryError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError, zipfile.BadZipFile) as exc:
        raise SurgeryError(f"--partition {path}: not a partition file written by --save-partition "
                           f"({type(exc).__name__}: {str(exc)[:80]})") from None
    if meta.get("format") != FORMAT:
        raise SurgeryError(f"--partition {path}: not a partition file (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta, partitions


def _load_npz(path: Path):
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(bytes(archive["meta"]).decode())
        partitions = {}
        for layer in meta.pop("layers"):
            experts = [archive[f"layer{layer}_expert{j}"].astype(np.int64) for j in range(meta["num_experts"])]
            partitions[int(layer)] = Partition(experts, archive[f"layer{layer}_shared"].astype(np.int64))
    return meta, partitions


def check_matches(path, meta: dict, partitions: dict[int, Partition], *, ffn: int, num_experts: int,
                  layers: list[int], strategy: str | None) -> None:
    """The file fits this model and these options: expert count, FFN size, layers, full coverage."""
    where = f"--partition {path}"
    if meta.get("intermediate_size") != ffn:
        raise SurgeryError(f"{where}: made for intermediate_size {meta.get('intermediate_size')}, the model has {ffn}")
    if meta.get("num_experts") != num_experts:
        raise SurgeryError(f"{where}: holds {meta.get('num_experts')} experts, --num-experts is {num_experts}")
    if strategy is not None and meta.get("strategy") != strategy:
        raise SurgeryError(f"{where}: made by strategy {meta.get('strategy')!r}, --strategy is {strategy!r}")
    if sorted(partitions) != sorted(layers):
        raise SurgeryError(f"{where}: covers layers {sorted(partitions)}, the split's MoE layers are {sorted(layers)}")
    for layer, partition in sorted(partitions.items()):
        if partition.num_experts != num_experts:
            raise SurgeryError(f"{where}: layer {layer} has {partition.num_experts} experts, expected {num_experts}")
        partition.check(ffn, f"{where}: layer {layer}")
