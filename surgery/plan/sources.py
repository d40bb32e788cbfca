"""The sources of a plan, opened and checked: a dense model for upcycle, split and merge, an MoE for prune,
extract and add-experts.

``open_dense_source`` refuses an MoE or a checkpoint missing a tensor its config implies, and exposes the
roles a family stores fused (Phi-3's ``qkv_proj``) as their own tensors; ``moe_family`` refuses a dense model
where an MoE is needed.
"""

from __future__ import annotations

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.families import Family
from surgery.io.checkpoint import Checkpoint


def check_dense_source(source: Checkpoint, source_family: Family) -> None:
    """The dense source holds every tensor its config implies, with the implied shape."""
    where = source.directory / "config.json"
    expected = arch.expected_tensors(source_family, source.config, where=where)
    for name, entry in expected.items():
        info = source.tensors.get(name)
        if info is None:
            raise SurgeryError(f"{source.directory}: tensor {name!r} is missing (expected shape {list(entry.shape)})")
        if tuple(info.shape) != entry.shape:
            raise SurgeryError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, config.json implies {list(entry.shape)}")


def open_dense_source(path) -> tuple[Checkpoint, Family]:
    """Open a dense checkpoint for an MoE operation, with its family, refusing MoE or broken inputs."""
    source = Checkpoint.open(path, require_config=True)
    family = arch.detect_family(source.config, source.directory / "config.json")
    if family.kind != "dense":
        raise SurgeryError(f"{source.directory}: {family.architecture} is already an MoE model; expected a dense model "
                           f"({', '.join(f.architecture for f in arch.FAMILIES.values() if f.kind == 'dense')})")
    check_dense_source(source, family)
    for name, (stored, start, stop) in arch.source_views(family, source.config).items():
        source.add_view(name, stored, (start, stop))  # roles stored fused (Phi-3's qkv_proj) read as their own
    return source, family


def moe_family(source: Checkpoint, operation: str) -> Family:
    """The MoE family of an opened source, refusing a dense model (prune, extract and add-experts read MoEs)."""
    family = arch.detect_family(source.config, source.directory / "config.json")
    if family.kind != "moe" or not family.experts:
        raise SurgeryError(f"{source.directory}: {operation} needs an MoE checkpoint; this is a {family.architecture} "
                           f"(dense)")
    return family


def leave_out_mtp(source: Checkpoint, family: Family, layout: str, new_config: dict, notes: list[str], operation: str,
                  why: str) -> None:
    """What an operation that writes only the family's table leaves out: a tensor the table does not know is refused
    (the operation would drop it); multi-token-prediction layers (``Family.mtp_prefixes``) are left out, the output's
    config says there are none (``Family.mtp_off``) and a note says so, and `why`."""
    known = arch.expected_tensors(family, source.config, layout, source.directory / "config.json")
    mtp = set(arch.mtp_tensors(family, source.config, source.tensors))
    extra = [name for name in source.tensors if name not in known and name not in mtp]
    if extra:
        raise SurgeryError(f"{source.directory}: tensor {extra[0]!r} is not part of a {family.architecture} "
                           f"checkpoint with this config.json; {operation} would drop it")
    if mtp:
        new_config.update(family.mtp_off)
        notes.append(f"the {len(mtp)} multi-token-prediction tensors are left out ("
                     + ", ".join(f"{key}: {value}" for key, value in family.mtp_off.items())
                     + f"): {why}; the output decodes without MTP speculation")
