"""A corpus of broken checkpoints, each built from a valid tiny model by one precise corruption.

Every entry is (kind, build(directory) -> path given to the command, expected message fragment,
commands it applies to). The tests in test_bad_inputs.py run each through every command.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

ALL = ("inspect", "copy", "upcycle", "split", "merge", "validate")
OPERATIONS = ("copy", "upcycle", "split", "merge", "validate")


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _edit_entry(directory: Path, name: str, **changes) -> None:
    path = directory / "model.safetensors"
    header, data = _header(path)
    header[name].update(changes)
    _write(path, header, data)


def _edit_index(directory: Path, edit) -> None:
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"


def truncated(d):
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def header_longer_than_file(d):
    path = d / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) + 10) + raw[8:])


def header_not_json(d):
    path = d / "model.safetensors"
    header, data = _header(path)
    body = b"{not json" + b" " * 7
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def offsets_out_of_range(d):
    header, data = _header(d / "model.safetensors")
    begin, end = header[NORM]["data_offsets"]
    _edit_entry(d, NORM, data_offsets=[len(data) + 64, len(data) + 64 + end - begin])


def offsets_overlapping(d):
    header, _ = _header(d / "model.safetensors")
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = names[0], names[1]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    start = header[first]["data_offsets"][0]
    if header[first]["data_offsets"][1] - start >= size:
        _edit_entry(d, second, data_offsets=[start, start + size])


def offsets_negative(d):
    _edit_entry(d, NORM, data_offsets=[-128, 0])


def dtype_unknown(d):
    _edit_entry(d, NORM, dtype="F13")


def size_mismatch(d):
    header, _ = _header(d / "model.safetensors")
    _edit_entry(d, NORM, shape=[header[NORM]["shape"][0] * 2])


def header_too_large(d):
    path = d / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")


def empty_file(d):
    (d / "model.safetensors").write_bytes(b"")


def shard_missing(d):
    sorted(d.glob("model-*.safetensors"))[-1].unlink()


def tensor_in_absent_shard(d):
    _edit_index(d, lambda index: index["weight_map"].__setitem__(NORM, "model-00099-of-00099.safetensors"))


def tensor_unlisted(d):
    _edit_index(d, lambda index: index["weight_map"].pop(NORM))


def tensor_in_two_shards(d):
    shards = sorted(d.glob("model-*.safetensors"))
    header, data = _header(shards[0])
    extra_name = next(k for k in header if k != "__metadata__")
    other, other_data = _header(shards[-1])
    begin, end = header[extra_name]["data_offsets"]
    other[extra_name] = dict(header[extra_name], data_offsets=[len(other_data), len(other_data) + end - begin])
    _write(shards[-1], other, other_data + data[begin:end])


def shard_path_traversal(d):
    _edit_index(d, lambda index: index["weight_map"].__setitem__(NORM, "../../etc/passwd"))


def shard_path_absolute(d):
    _edit_index(d, lambda index: index["weight_map"].__setitem__(NORM, "/etc/passwd"))


def shard_name_with_nul(d):
    _edit_index(d, lambda index: index["weight_map"].__setitem__(NORM, "model\x00.safetensors"))


def index_not_json(d):
    (d / "model.safetensors.index.json").write_text("{'weight_map': ")


def config_missing(d):
    (d / "config.json").unlink()


def config_not_json(d):
    (d / "config.json").write_text("{hidden_size: 32")


def architecture_unknown(d):
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")


def hidden_size_disagrees(d):
    _edit_config(d, hidden_size=48, head_dim=12)


def heads_do_not_divide(d):
    _edit_config(d, num_key_value_heads=3)


def pickle_bin(d):
    for path in d.glob("*.safetensors"):
        path.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")


def pickle_pt_file(d):
    (d / "model.pt").write_bytes(b"\x80\x04K\x01.")
    return d / "model.pt"


def nonfinite_weight(d):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][1, 2] = float("inf")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


# (kind, build, sharded source?, message fragment, commands)
CORPUS = [
    ("truncated file", truncated, False, "is beyond the data section", ALL),
    ("header length larger than the file", header_longer_than_file, False, "is larger than the file", ALL),
    ("header not JSON", header_not_json, False, "header is not valid JSON", ALL),
    ("offsets out of range", offsets_out_of_range, False, "is beyond the data section", ALL),
    ("offsets overlapping", offsets_overlapping, False, "overlap", ALL),
    ("offsets negative", offsets_negative, False, "are negative or reversed", ALL),
    ("dtype unknown", dtype_unknown, False, "unknown dtype 'F13'", ALL),
    ("shape x dtype size differs from byte range", size_mismatch, False, "needs", ALL),
    ("header larger than the sane limit", header_too_large, False, "exceeds the limit", ALL),
    ("empty file", empty_file, False, "file is empty", ALL),
    ("index: shard listed but missing", shard_missing, True, "is missing from", ALL),
    ("index: tensor listed in an absent shard", tensor_in_absent_shard, True, "model-00099-of-00099.safetensors", ALL),
    ("index: tensor in a shard but not in the index", tensor_unlisted, True, "is in the shard but not in model.safetensors.index.json", ALL),
    ("index: same tensor in two shards", tensor_in_two_shards, True, "is stored in two shards", ALL),
    ("index: shard path with ..", shard_path_traversal, True, "outside the checkpoint directory (refused)", ALL),
    ("index: absolute shard path", shard_path_absolute, True, "outside the checkpoint directory (refused)", ALL),
    ("index: shard name with a NUL byte", shard_name_with_nul, True, "which is not a valid file name", ALL),
    ("index not JSON", index_not_json, True, "model.safetensors.index.json: not valid JSON", ALL),
    ("config missing", config_missing, False, "config.json: no such file", ("upcycle", "split", "merge", "validate")),
    ("config not JSON", config_not_json, False, "config.json: not valid JSON", ALL),
    ("architecture unknown", architecture_unknown, False, "'GPT2LMHeadModel' is not supported (supported: ", ("inspect", "upcycle", "split", "merge", "validate")),
    ("hidden size disagrees with tensor shapes", hidden_size_disagrees, False, "config.json implies", ("upcycle", "split", "merge", "validate")),
    ("head counts that do not divide", heads_do_not_divide, False, "must be a multiple of num_key_value_heads (3)", ("inspect", "upcycle", "split", "merge", "validate")),
    ("pickle checkpoint (pytorch_model.bin)", pickle_bin, False, "pickle checkpoints are refused", ALL),
    ("pickle checkpoint (.pt file)", pickle_pt_file, False, "pickle checkpoints are refused", ALL),
    ("NaN/Inf weight", nonfinite_weight, False, "has 0 NaN and 1 Inf values", ("copy", "upcycle", "split", "merge")),
]
