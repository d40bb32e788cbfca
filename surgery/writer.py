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

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from surgery import __version__, console
from surgery.checkpoint import INDEX_NAME, SINGLE_NAME, torch_dtype
from surgery.errors import SurgeryError
from surgery.plan import OutputTensor, Plan
from surgery.recipes import Copy, Deferred, Joined
from surgery.safetensors_format import DTYPE_SIZES, FLOAT_DTYPES, encode_header, read_header

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
COPY_CHUNK = 16 * 2**20  # bytes per read/write/hash step: small enough to keep RSS flat
MANIFEST_NAME = "surgery-manifest.json"


@dataclass
class Shard:
    file_name: str
    tensors: list[OutputTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Filled:
    """What ``fill`` returns for a draft: the value of every Deferred tensor, and side files that
    replace the plan's (a model card that reports what the fit found)."""

    tensors: dict  # output name -> torch tensor
    extra_files: dict[str, str] = field(default_factory=dict)


def is_deferred(tensor: OutputTensor) -> bool:
    return isinstance(tensor.recipe, Deferred)


def is_byte_copy(tensor: OutputTensor) -> bool:
    """Whether the writer copies this tensor's bytes unchanged (no torch, no computation)."""
    recipe = tensor.recipe
    return isinstance(recipe, Copy) and recipe.checkpoint.info(recipe.name).dtype == tensor.dtype


def needs_torch(tensor: OutputTensor) -> bool:
    """Whether writing this tensor imports torch: neither a byte copy nor computable with numpy alone (a
    Joined tensor: whether any part does)."""
    if isinstance(tensor.recipe, Joined):
        return any(needs_torch(OutputTensor(tensor.name, (), tensor.dtype, part)) for part in tensor.recipe.items)
    return not is_byte_copy(tensor) and not tensor.recipe.numpy_ready(tensor.dtype)


def assign_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[Shard]:
    """Greedy, in plan order: a new shard starts when the next tensor would overflow this one.

    Within a shard, byte copies come first and computed tensors after (each group in plan order):
    the copies need no torch, so torch is imported in the background while the kernel copies.
    Deferred tensors come last, so the shard can be hashed up to them while it is written.
    """
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    groups = [sorted(group, key=lambda tensor: (is_deferred(tensor), not is_byte_copy(tensor))) for group in groups]
    if len(groups) == 1:
        return [Shard(SINGLE_NAME, groups[0])]
    count = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{count:05d}.safetensors", group) for i, group in enumerate(groups)]


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
               allow_nonfinite: bool = False, fill: Callable[[Path], Filled] | None = None) -> list[Shard]:
    """Execute `plan` into directory `out`; returns the shards written.

    Floating-point data is checked for NaN/Inf on the way (each input tensor once): a checkpoint
    with non-finite weights is refused unless `allow_nonfinite`. `fill(draft directory)` gives the
    values of the plan's Deferred tensors (required when it has any).
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
            checker = _FiniteCheck(enabled=not allow_nonfinite)
            digests = {}
            hashing: list[tuple[str, _TailHasher]] = []  # shards written, hash maybe still running
            held: list[_HeldShard] = []  # shards with deferred tensors: hashed up to them
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
                    filled = fill(temp)
                    for shard in held:
                        digests[shard.path.name] = shard.complete(filled.tensors, checker)
                finally:
                    for shard in held:  # on failure, lets the waiting hashers end
                        shard.hasher.advance(shard.hasher.written, finished=True)
                extra_files.update(filled.extra_files)
            for name, text in extra_files.items():
                (temp / name).write_text(text)
            verify_written(temp, shards)
            _write_manifest(temp, plan, digests)
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
            import torch  # noqa: F401
        except BaseException:  # the main thread's own import reports any real problem
            pass

    thread = threading.Thread(target=load, name="import-torch", daemon=True)
    thread.start()
    return thread


READ_AHEAD_BYTES = int(os.environ.get("SURGERY_READ_AHEAD_BYTES", 256 * 2**20))  # 0 turns it off


class _ReadAhead:
    """Asks the kernel (posix_fadvise WILLNEED) to start reading the inputs of the next tensors, up to
    READ_AHEAD_BYTES beyond the current one, while this one is copied, computed and written: the disk
    works on the next tensor instead of waiting for the writer to ask for it."""

    def __init__(self, tensors: list[OutputTensor]):
        self.tensors = tensors
        self.advised = 0  # tensors[:advised] have had their inputs advised
        self.ends: list[int] = []  # running total of advised bytes after each advised tensor
        self.enabled = READ_AHEAD_BYTES > 0 and hasattr(os, "posix_fadvise")

    def before(self, position: int) -> None:
        """Called before tensors[position] is written."""
        if not self.enabled:
            return
        done = self.ends[position - 1] if position else 0
        while self.advised < len(self.tensors) and (not self.ends or self.ends[-1] - done < READ_AHEAD_BYTES):
            total = self.ends[-1] if self.ends else 0
            for checkpoint, name in self.tensors[self.advised].recipe.inputs():
                info = checkpoint.info(name)
                try:
                    os.posix_fadvise(checkpoint._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
                except OSError:
                    self.enabled = False
                    return
                total += info.nbytes
            self.ends.append(total)
            self.advised += 1


class _FiniteCheck:
    """Refuses NaN/Inf in floating-point inputs and results, checking each input tensor once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.checked: set = set()

    def needed(self, checkpoint, name: str) -> bool:
        key = (id(checkpoint), name)
        return self.enabled and checkpoint.info(name).dtype in FLOAT_DTYPES and key not in self.checked

    def done(self, checkpoint, name: str) -> None:
        self.checked.add((id(checkpoint), name))

    def check_value(self, value, where: str) -> None:
        import torch

        if self.enabled and value.is_floating_point() and value.numel() and not _finite_sum(value):
            if not bool(torch.isfinite(value).all()):  # the sum may overflow on finite data: count exactly
                nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
                raise SurgeryError(f"{where} has {nan} NaN and {inf} Inf values; refusing to write "
                                   "(pass --allow-nonfinite to write it anyway)")

    def check_bytes(self, data, dtype: str, where: str) -> None:
        """The same check on raw little-endian bytes, with numpy (no torch import for plain copies)."""
        import numpy as np

        if not self.enabled:
            return
        if dtype in ("F32", "F64"):
            values = np.frombuffer(data, dtype=np.float32 if dtype == "F32" else np.float64)
            with np.errstate(all="ignore"):  # NaN/Inf propagate through the sum; an overflow is recounted
                if np.isfinite(values.sum()):
                    return
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        else:  # F16 / BF16: exponent bits all ones means Inf or NaN
            bits = np.frombuffer(data, dtype=np.uint16)
            exponent, mantissa = (0x7C00, 0x03FF) if dtype == "F16" else (0x7F80, 0x007F)
            special = (bits & exponent) == exponent
            if not special.any():
                return
            nan = int((special & ((bits & mantissa) != 0)).sum())
            inf = int(special.sum()) - nan
        if nan or inf:
            raise SurgeryError(f"{where} has {nan} NaN and {inf} Inf values; refusing to write "
                               "(pass --allow-nonfinite to write it anyway)")


def _finite_sum(value) -> bool:
    """Whether the sum of `value`, in its own dtype, is finite. NaN and Inf propagate through a sum, so
    a finite sum proves every element finite; a sum that overflows on finite data is recounted exactly
    by the caller. Summing in the tensor's own dtype needs no temporary copy (a float64 sum of a
    float32 tensor is over 20 times slower)."""
    import math

    return math.isfinite(float(value.sum()))


class _TailHasher(threading.Thread):
    """sha256 of a file while it is being written: follows the writer, reading back (from the page
    cache) each range as soon as it is complete, so hashing overlaps writing instead of following it."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.digest = hashlib.sha256()
        self.written = 0
        self.finished = False
        self.error: BaseException | None = None
        self.condition = threading.Condition()

    def advance(self, written: int, finished: bool = False) -> None:
        with self.condition:
            self.written, self.finished = written, finished
            self.condition.notify()

    def run(self) -> None:
        try:
            position = 0
            # one buffer for every read: fresh buffers of varying size make glibc keep freed heap
            # memory, so peak RSS grew with the number of tensors in a shard (bench/bench_scale.py)
            buffer = memoryview(bytearray(COPY_CHUNK))
            with open(self.path, "rb", buffering=0) as handle:
                while True:
                    with self.condition:
                        while position >= self.written and not self.finished:
                            self.condition.wait()
                        limit, finished = self.written, self.finished
                    while position < limit:
                        got = handle.readinto(buffer[:min(COPY_CHUNK, limit - position)])
                        if not got:
                            raise OSError(f"{self.path}: ended at {position} bytes while hashing")
                        self.digest.update(buffer[:got])
                        position += got
                    if finished and position >= self.written:
                        return
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self) -> str:
        self.advance(self.written, finished=True)
        self.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()


@dataclass
class _HeldShard:
    """A written shard and its hasher, which has hashed up to the shard's deferred tensors (zeros so far)."""

    path: Path
    hasher: "_TailHasher"
    offsets: dict[str, tuple[int, OutputTensor]]  # deferred tensor name -> (file offset, tensor)

    def complete(self, values: dict, checker: _FiniteCheck) -> str:
        """Write each deferred tensor's value in place; returns the shard's sha256."""
        import torch

        with open(self.path, "r+b") as handle:
            for name, (offset, tensor) in self.offsets.items():
                if name not in values:
                    raise AssertionError(f"fill gave no value for deferred tensor {name}")
                value = values[name]
                checker.check_value(value, f"output tensor {name!r} ({tensor.recipe.describe()[:120]})")
                if tuple(value.shape) != tuple(tensor.shape):
                    raise AssertionError(f"fill gave {name} shape {list(value.shape)}, plan says {list(tensor.shape)}")
                data = value.detach().to("cpu", torch_dtype(tensor.dtype)).contiguous().reshape(-1)
                handle.seek(offset)
                handle.write(memoryview(data.view(torch.uint8).numpy()))
            handle.flush()
            self.hasher.advance(os.fstat(handle.fileno()).st_size, finished=True)
        return self.hasher.result()


def _write_shard(path: Path, shard: Shard, metadata: dict[str, str], advance, checker: _FiniteCheck) -> _HeldShard:
    """Write one shard; returns it with its hasher, which may still be hashing the last bytes written
    (or, in a shard with deferred tensors, waits before them)."""
    header, offsets = encode_header([(t.name, t.dtype, t.shape) for t in shard.tensors], metadata)
    deferred = {t.name: (len(header) + offset, t) for t, offset in zip(shard.tensors, offsets) if is_deferred(t)}
    hold = min((offset for offset, _ in deferred.values()), default=None)
    with open(path, "wb") as handle:
        hasher = _TailHasher(path)
        hasher.start()
        try:
            _write_shard_body(handle, header, shard, advance, checker, hasher, hold)
        except BaseException:
            hasher.advance(handle.tell(), finished=True)  # lets the thread end
            raise
        hasher.advance(handle.tell() if hold is None else hold, finished=hold is None)
    return _HeldShard(path, hasher, deferred)


def _write_shard_body(handle, header: bytes, shard: Shard, advance, checker: _FiniteCheck, hasher: _TailHasher,
                      hold: int | None) -> None:
    path = Path(handle.name)
    handle.write(header)
    read_ahead = _ReadAhead(shard.tensors)
    scratch = None
    for position, tensor in enumerate(shard.tensors):
        recipe = tensor.recipe
        read_ahead.before(position)
        if is_deferred(tensor):  # zeros until the draft is filled
            for start in range(0, tensor.nbytes, COPY_CHUNK):
                handle.write(bytes(min(COPY_CHUNK, tensor.nbytes - start)))
        elif isinstance(recipe, Joined):  # part after part: the whole tensor is never in memory
            for part in recipe.items:
                scratch = _write_piece(handle, OutputTensor(tensor.name, (), tensor.dtype, part), checker, scratch)
        else:
            scratch = _write_piece(handle, tensor, checker, scratch)
        handle.flush()
        hasher.advance(handle.tell() if hold is None else min(handle.tell(), hold))
        advance(tensor.nbytes, tensor.name)
    expected = len(header) + shard.nbytes
    if handle.tell() != expected:
        raise AssertionError(f"{path}: wrote {handle.tell()} bytes, planned {expected}")


def _write_piece(handle, tensor: OutputTensor, checker: _FiniteCheck, scratch):
    """One tensor's bytes (or one part of a Joined tensor: its shape is then ()): a kernel copy, a checked copy
    or a computed value. Returns the copy buffer, reused across calls."""
    recipe = tensor.recipe
    if is_byte_copy(tensor):
        if tensor.shape and tuple(recipe.stored_shape()) != tuple(tensor.shape):
            info = recipe.checkpoint.info(recipe.name)
            raise SurgeryError(f"{info.file}: tensor {recipe.name!r} has shape {list(recipe.stored_shape())}, plan "
                               f"expects {list(tensor.shape)}")
        if checker.needed(recipe.checkpoint, recipe.name):
            scratch = scratch or bytearray(COPY_CHUNK)
            _copy_checked(handle, recipe, checker, scratch)
        else:
            _copy_bytes(handle, recipe)
    elif not tensor.shape:
        _write_value(handle, tensor, checker, recipe.compute())
    else:
        _write_tensor(handle, tensor, checker)
    return scratch


def _copy_bytes(handle, recipe: Copy) -> None:
    info = recipe.checkpoint.info(recipe.name)
    handle.flush()
    source_fd = recipe.checkpoint._fd(info.file)
    offset, remaining = recipe.byte_span()
    out_fd = handle.fileno()
    out_offset = handle.tell()
    try:
        while remaining:
            copied = os.copy_file_range(source_fd, out_fd, min(remaining, 1 << 30), offset, out_offset)
            if copied == 0:
                raise SurgeryError(f"{info.file}: tensor {recipe.name!r}: file ended early (truncated?)")
            remaining -= copied
            offset += copied
            out_offset += copied
        handle.seek(out_offset)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (18, 22, 38, 95, 1):  # EXDEV EINVAL ENOSYS EOPNOTSUPP EPERM
            raise
        handle.seek(out_offset)
        while remaining:  # plain chunked copy where the kernel cannot do it
            count = min(remaining, COPY_CHUNK)
            chunk = os.pread(source_fd, count, offset)
            if not chunk:
                raise SurgeryError(f"{info.file}: tensor {recipe.name!r}: file ended early (truncated?)")
            handle.write(chunk)
            remaining -= len(chunk)
            offset += len(chunk)


def _copy_checked(handle, recipe: Copy, checker: _FiniteCheck, scratch: bytearray) -> None:
    """Copy through memory in chunks, checking floating-point data for NaN/Inf on the way (a whole input
    tensor is then known finite; a block of rows is checked each time it is copied)."""
    from surgery.safetensors_format import pread_into

    info = recipe.checkpoint.info(recipe.name)
    itemsize = DTYPE_SIZES[info.dtype]
    chunk = COPY_CHUNK - COPY_CHUNK % itemsize
    fd = recipe.checkpoint._fd(info.file)
    offset, nbytes = recipe.byte_span()
    buffer = memoryview(scratch)  # reused for every chunk: no fresh pages to fault in each time
    for start in range(0, nbytes, chunk):
        data = buffer[:min(chunk, nbytes - start)]
        pread_into(fd, data, offset + start, info.file, recipe.name)
        checker.check_bytes(data, info.dtype, f"{info.file}: tensor {recipe.name!r}")
        handle.write(data)
    if recipe.rows is None:
        checker.done(recipe.checkpoint, recipe.name)


@contextmanager
def _checking_output(tensor: OutputTensor, checker: _FiniteCheck):
    """Around the NaN/Inf check of a computed tensor: yields how to name it, and when the check
    fails, names the source file and tensor instead if an input is the cause."""
    try:
        yield f"output tensor {tensor.name!r} ({tensor.recipe.describe()[:120]})"
    except SurgeryError:
        _blame_input(tensor, checker)
        raise


def _blame_input(tensor: OutputTensor, checker: _FiniteCheck) -> None:
    """Raise the NaN/Inf error for the first input of `tensor` that holds such values, if any."""
    from surgery.safetensors_format import pread_exact

    for checkpoint, name in tensor.recipe.inputs():
        info = checkpoint.info(name)
        if info.dtype in FLOAT_DTYPES:
            data = pread_exact(checkpoint._fd(info.file), info.nbytes, info.offset, info.file, name)
            checker.check_bytes(data, info.dtype, f"{info.file}: tensor {name!r}")


def _write_array(handle, tensor: OutputTensor, checker: _FiniteCheck) -> None:
    """A tensor computed with numpy (recipe.numpy_ready): checked and written without torch."""
    import numpy as np

    array = np.ascontiguousarray(tensor.recipe.compute_array(tensor.dtype))
    if tuple(array.shape) != tuple(tensor.shape) or array.nbytes != tensor.nbytes:
        raise AssertionError(f"recipe for {tensor.name} produced {array.dtype} {list(array.shape)}, plan says "
                             f"{tensor.dtype} {list(tensor.shape)}")
    data = memoryview(array.reshape(-1)).cast("B")
    with _checking_output(tensor, checker) as where:
        checker.check_bytes(data, tensor.dtype, where)
    handle.write(data)


def _write_tensor(handle, tensor: OutputTensor, checker: _FiniteCheck) -> None:
    if not needs_torch(tensor):
        return _write_array(handle, tensor, checker)
    value = tensor.recipe.compute()
    if tuple(value.shape) != tuple(tensor.shape):
        raise AssertionError(f"recipe for {tensor.name} produced shape {list(value.shape)}, plan says {list(tensor.shape)}")
    _write_value(handle, tensor, checker, value)


def _write_value(handle, tensor: OutputTensor, checker: _FiniteCheck, value) -> None:
    """A computed value, checked for NaN/Inf, cast to the tensor's dtype and written."""
    import torch

    with _checking_output(tensor, checker) as where:
        checker.check_value(value, where)
    target = torch_dtype(tensor.dtype)
    if value.dtype != target:
        value = value.to(target)
    value = value.contiguous()
    if value.numel():
        handle.write(memoryview(value.view(torch.uint8).numpy()) if value.dim() else value.reshape(1).view(torch.uint8).numpy())


def _write_side_files(plan: Plan, temp: Path, shards: list[Shard]) -> None:
    for path in plan.side_files:
        shutil.copy2(path, temp / path.name)
    if plan.config is not None:
        (temp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    if len(shards) > 1:
        index = {"metadata": {"total_size": plan.total_bytes},
                 "weight_map": {t.name: shard.file_name for shard in shards for t in shard.tensors}}
        (temp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_manifest(temp: Path, plan: Plan, shard_digests: dict[str, str]) -> None:
    """sha256 of every file in the output, so `surgery verify` can tell a damaged copy later."""
    from surgery.verify import sha256_file

    files = dict(shard_digests)
    for path in sorted(temp.iterdir()):
        if path.name not in files and path.is_file():
            files[path.name] = sha256_file(path)
    manifest = {"surgery_version": __version__, "operation": plan.operation,
                "total_bytes": plan.total_bytes, "files": dict(sorted(files.items()))}
    (temp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def verify_written(directory: Path, shards: list[Shard]) -> None:
    """Re-read every shard header and compare with the plan; then let safetensors open each one."""
    from safetensors import safe_open

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
