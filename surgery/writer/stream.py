"""The streaming writer: executes any plan into a Hugging Face style safetensors directory.

Shapes and dtypes are known up front, so each shard's header is written first and each tensor's
bytes are appended as soon as it is computed: peak memory is about one tensor, never a shard.
Unchanged tensors are copied by the kernel (``os.copy_file_range``) without passing through
Python. Output goes to a temporary directory beside the target, is checked (every shard's header
re-read and compared with the plan, then opened with ``safetensors.safe_open``) and renamed into
place only when complete; on any failure or signal the temporary directory is removed.

A plan may hold ``Deferred`` tensors, whose values need the written model itself (routers fitted
by running it): they go last in their shard, the rest is written, ``fill`` runs on the draft (a
loadable checkpoint with its config) and returns their values, which are written in place before
the draft is hashed to the end, checked and renamed. The model is then read once, from the draft,
instead of being computed twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from safetensors import safe_open

from surgery import __version__, console
from surgery.errors import SurgeryError
from surgery.io.checkpoint import INDEX_NAME
from surgery.io.file_io import WRITE_CHUNK
from surgery.io.safetensors_format import encode_header, read_header
from surgery.plan.nodes import Joined
from surgery.plan.plan import OutputTensor, Plan
from surgery.process_memory import bound_process_memory
from surgery.writer.deferred import Filled, HeldShard
from surgery.writer.finite_check import FiniteCheck
from surgery.writer.hashing import TailHasher
from surgery.writer.manifest import write_manifest
from surgery.writer.read_ahead import ReadAhead
from surgery.writer.shards import Shard, assign_shards, is_deferred, needs_torch
from surgery.writer.tensor_bytes import write_piece

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


def check_output_path(out: Path, sources, force: bool) -> None:
    out_resolved = out.resolve()
    for source in sources:
        source_dir = source.directory.resolve()
        if out_resolved == source_dir or out_resolved.is_relative_to(source_dir):
            raise SurgeryError(f"{out}: output is inside the input {source.directory}; choose a directory outside it")
        if source_dir.is_relative_to(out_resolved):
            raise SurgeryError(f"{out}: output would contain the input {source.directory}; choose another directory")
    if out.exists() and not force:
        raise SurgeryError(f"{out}: output already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise SurgeryError(f"{out}: exists and is not a directory")
    parent = out_resolved.parent
    if not parent.is_dir():
        raise SurgeryError(f"{out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SurgeryError(f"{out}: parent directory {parent} is not writable")


class _Interrupted(BaseException):
    pass


@contextmanager
def _signals_raise():
    """Turn SIGTERM (and SIGINT) into an exception so cleanup code runs."""
    def handler(signum, frame):
        raise _Interrupted(signal.Signals(signum).name)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread
            pass
    try:  # past a file-size limit, fail the write (EFBIG) instead of being killed mid-file
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except (ValueError, AttributeError):
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def write_plan(plan: Plan, out, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
               allow_nonfinite: bool = False, fill: Callable[[Path, Callable], Filled] | None = None) -> list[Shard]:
    """Execute `plan` into directory `out`; returns the shards written.

    Floating-point data is checked for NaN/Inf on the way (each input tensor once): a checkpoint
    with non-finite weights is refused unless `allow_nonfinite`. `fill(draft directory, patch)` gives the
    values of the plan's Deferred tensors (required when it has any): ``patch(name, value)`` writes one
    into the draft at once (so a fill that computes them layer by layer holds one layer), the rest come
    back in ``Filled.tensors``.
    """
    out = Path(out)
    check_output_path(out, plan.sources, force)
    shards = assign_shards(plan.tensors, max_shard_size)
    if any(is_deferred(t) for t in plan.tensors) and fill is None:
        raise AssertionError("a plan with deferred tensors needs `fill`")
    temp = out.parent / f".{out.name}.surgery-tmp-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    importer = _import_torch_in_background(shards)
    try:
        with _signals_raise():
            try:
                temp.mkdir()
            except OSError as exc:
                raise SurgeryError(f"{out}: cannot create a directory beside it ({temp.name}): "
                                   f"{exc.strerror or exc}; is {out.parent} writable?") from None
            metadata = {"format": "pt", "surgery_version": __version__, "surgery_operation": plan.operation,
                        **plan.metadata}
            checker = FiniteCheck(enabled=not allow_nonfinite)
            digests = {}
            hashing: list[tuple[str, TailHasher]] = []  # shards written, hash maybe still running
            held: list[HeldShard] = []  # shards with deferred tensors: hashed up to them
            with console.progress(f"{plan.operation} → {out.name}", plan.total_bytes) as advance:
                for shard in shards:
                    written = _write_shard(temp / shard.file_name, shard, metadata, advance, checker)
                    (held.append(written) if written.offsets else hashing.append((shard.file_name, written.hasher)))
                    while len(hashing) > 1:  # the last shard's hash may finish while the next one is written
                        name, hasher = hashing.pop(0)
                        digests[name] = hasher.result()
                digests.update((name, hasher.result()) for name, hasher in hashing)
            _write_side_files(plan, temp, shards)
            extra_files = dict(plan.extra_files)
            if fill is not None:
                try:
                    for shard in held:  # a NaN in a copied input is refused before the (long) fill
                        shard.hasher.settle()
                    by_name = {name: shard for shard in held for name in shard.offsets}
                    filled = fill(temp, lambda name, value, start_row=None: by_name[name].write(
                        name, value, checker, start_row=start_row))
                    for shard in held:
                        digests[shard.path.name] = shard.complete(filled.tensors, checker)
                finally:
                    for shard in held:  # on failure, lets the waiting hashers end
                        shard.hasher.advance(shard.hasher.written, finished=True)
                extra_files.update(filled.extra_files)
            for name, text in extra_files.items():
                (temp / name).write_text(text)
            verify_written(temp, shards)
            write_manifest(temp, plan, digests)
            if out.exists():
                trash = out.parent / f".{out.name}.surgery-old-{os.getpid()}"
                out.rename(trash)
                temp.rename(out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                temp.rename(out)
        if importer is not None:
            importer.join()  # already done: a computed tensor imported torch, waiting for this thread
    except _Interrupted as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise SurgeryError(f"interrupted by {exc}; removed the partial output, {out} was not written") from None
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise SurgeryError(f"{out}: writing failed: {exc.strerror or exc} ({getattr(exc, 'filename', None) or temp}); "
                           "removed the partial output") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return shards


def _import_torch_in_background(shards: list[Shard]) -> threading.Thread | None:
    """Start importing torch (about 2 s) while the first byte copies run, if any tensor needs it.

    A daemon thread that failure paths never join: a signal that interrupts the main thread inside
    the import machinery can leave CPython's import lock held (a known CPython limitation), and
    joining would then wait forever."""
    if "torch" in sys.modules or not any(needs_torch(tensor) for shard in shards for tensor in shard.tensors):
        return None

    def load():
        try:
            import torch  # noqa: F401  # lazy: importing it, in this thread, is the point
        except BaseException:  # the main thread's own import reports any real problem
            pass

    bound_process_memory()  # before the thread allocates: one malloc arena for the process
    thread = threading.Thread(target=load, name="import-torch", daemon=True)
    thread.start()
    return thread


def _write_shard(path: Path, shard: Shard, metadata: dict[str, str], advance, checker: FiniteCheck) -> HeldShard:
    """Write one shard; returns it with its hasher, which may still be hashing the last bytes written
    (or, in a shard with deferred tensors, waits before them)."""
    header, offsets = encode_header([(t.name, t.dtype, t.shape) for t in shard.tensors], metadata)
    deferred = {t.name: (len(header) + offset, t) for t, offset in zip(shard.tensors, offsets) if is_deferred(t)}
    hold = min((offset for offset, _ in deferred.values()), default=None)
    with open(path, "wb") as handle:
        hasher = TailHasher(path)
        hasher.start()
        try:
            _write_shard_body(handle, header, shard, advance, checker, hasher, hold)
        except BaseException:
            hasher.advance(handle.tell(), finished=True)  # lets the thread end
            raise
        hasher.advance(handle.tell() if hold is None else hold, finished=hold is None)
    return HeldShard(path, hasher, deferred)


def _write_shard_body(handle, header: bytes, shard: Shard, advance, checker: FiniteCheck, hasher: TailHasher,
                      hold: int | None) -> None:
    path = Path(handle.name)
    handle.write(header)
    read_ahead = ReadAhead(shard.tensors)
    scratch = None
    for position, tensor in enumerate(shard.tensors):
        recipe = tensor.recipe
        read_ahead.before(position)
        if is_deferred(tensor):  # zeros until the draft is filled
            zeros = bytes(min(WRITE_CHUNK, tensor.nbytes))
            for start in range(0, tensor.nbytes, WRITE_CHUNK):
                handle.write(zeros[:min(WRITE_CHUNK, tensor.nbytes - start)])
        elif isinstance(recipe, Joined):  # part after part: the whole tensor is never in memory
            for part in recipe.items:
                scratch = write_piece(handle, OutputTensor(tensor.name, (), tensor.dtype, part), checker, scratch,
                                      hasher)
        else:
            scratch = write_piece(handle, tensor, checker, scratch, hasher)
        handle.flush()
        hasher.advance(handle.tell() if hold is None else min(handle.tell(), hold))
        advance(tensor.nbytes, tensor.name)
    expected = len(header) + shard.nbytes
    if handle.tell() != expected:
        raise AssertionError(f"{path}: wrote {handle.tell()} bytes, planned {expected}")


def _write_side_files(plan: Plan, temp: Path, shards: list[Shard]) -> None:
    for path in plan.side_files:
        shutil.copy2(path, temp / path.name)
    if plan.config is not None:
        (temp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    if len(shards) > 1:
        index = {"metadata": {"total_size": plan.total_bytes},
                 "weight_map": {t.name: shard.file_name for shard in shards for t in shard.tensors}}
        (temp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def verify_written(directory: Path, shards: list[Shard]) -> None:
    """Re-read every shard header and compare with the plan; then let safetensors open each one."""
    for shard in shards:
        path = directory / shard.file_name
        header = read_header(path)
        planned = {t.name: (t.dtype, tuple(t.shape)) for t in shard.tensors}
        found = {name: (info.dtype, tuple(info.shape)) for name, info in header.tensors.items()}
        if planned != found:
            raise AssertionError(f"{path}: header does not match the plan")
        end = max((info.offset + info.nbytes for info in header.tensors.values()), default=header.data_start)
        if path.stat().st_size != end:
            raise AssertionError(f"{path}: size {path.stat().st_size} bytes, header says {end}")
        with safe_open(str(path), framework="numpy") as handle:
            if set(handle.keys()) != set(planned):
                raise AssertionError(f"{path}: safetensors sees other tensors than planned")
