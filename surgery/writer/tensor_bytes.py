"""One tensor's bytes into a shard being written: a kernel copy, a checked copy or a computed value.

``write_piece`` picks the way: an unchanged tensor is copied by the kernel (``os.copy_file_range``), or
through memory in chunks when its NaN/Inf check is due; a computed one is made with numpy where the
recipe allows (no torch), else with torch, checked, cast to the output dtype and written.
"""

from __future__ import annotations

import math
import os

import numpy as np

from surgery.errors import SurgeryError
from surgery.io.dtypes import DTYPE_SIZES, torch_dtype
from surgery.io.file_io import COPY_CHUNK, pread_into, write_all
from surgery.plan.nodes import Copy
from surgery.plan.plan import OutputTensor
from surgery.writer.finite_check import FiniteCheck, checking_output
from surgery.writer.shards import is_byte_copy, needs_torch


def write_piece(handle, tensor: OutputTensor, checker: FiniteCheck, scratch, hasher=None):
    """One tensor's bytes (or one part of a Joined tensor: its shape is then ()): a kernel copy, a checked copy
    or a computed value. Returns the copy buffer, reused across calls. With `hasher` (the shard's
    ``TailHasher``), a copy that needs its NaN/Inf check is a kernel copy all the same, checked by the hasher
    on the bytes it reads back to hash."""
    recipe = tensor.recipe
    if is_byte_copy(tensor):
        if tensor.shape and tuple(recipe.stored_shape()) != tuple(tensor.shape):
            info = recipe.checkpoint.info(recipe.name)
            raise SurgeryError(f"{info.file}: tensor {recipe.name!r} has shape {list(recipe.stored_shape())}, plan "
                               f"expects {list(tensor.shape)}")
        if checker.needed(recipe.checkpoint, recipe.name) and hasher is not None:
            info = recipe.checkpoint.info(recipe.name)
            handle.flush()
            start = handle.tell()
            hasher.check(start, start + recipe.byte_span()[1], info.dtype, f"{info.file}: tensor {recipe.name!r}",
                         checker)
            if recipe.rows is None:
                checker.done(recipe.checkpoint, recipe.name)
            _copy_bytes(handle, recipe)
        elif checker.needed(recipe.checkpoint, recipe.name):
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
    source_fd = recipe.checkpoint.descriptor(info.file)
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
            write_all(handle, chunk)
            remaining -= len(chunk)
            offset += len(chunk)


def _copy_checked(handle, recipe: Copy, checker: FiniteCheck, scratch: bytearray) -> None:
    """Copy through memory in chunks, checking floating-point data for NaN/Inf on the way (a whole input
    tensor is then known finite; a block of rows is checked each time it is copied)."""
    info = recipe.checkpoint.info(recipe.name)
    itemsize = DTYPE_SIZES[info.dtype]
    chunk = COPY_CHUNK - COPY_CHUNK % itemsize
    fd = recipe.checkpoint.descriptor(info.file)
    offset, nbytes = recipe.byte_span()
    buffer = memoryview(scratch)  # reused for every chunk: no fresh pages to fault in each time
    for start in range(0, nbytes, chunk):
        data = buffer[:min(chunk, nbytes - start)]
        pread_into(fd, data, offset + start, info.file, recipe.name)
        checker.check_bytes(data, info.dtype, f"{info.file}: tensor {recipe.name!r}")
        write_all(handle, data)
    if recipe.rows is None:
        checker.done(recipe.checkpoint, recipe.name)


def _write_array(handle, tensor: OutputTensor, checker: FiniteCheck) -> None:
    """A tensor computed with numpy (recipe.numpy_ready): checked and written without torch, a block of rows at
    a time as the recipe yields them."""
    written, row_shape = 0, tuple(tensor.shape[1:])
    for block in tensor.recipe.array_blocks(tensor.dtype):
        block = np.ascontiguousarray(block)
        if math.prod(block.shape[1:]) != math.prod(row_shape) or written + block.nbytes > tensor.nbytes:
            raise AssertionError(f"recipe for {tensor.name} produced a {block.dtype} block {list(block.shape)} "
                                 f"beyond the plan's {tensor.dtype} {list(tensor.shape)}")
        data = memoryview(block.reshape(-1)).cast("B")
        with checking_output(tensor, checker) as where:
            checker.check_bytes(data, tensor.dtype, where)
        write_all(handle, data)
        written += block.nbytes
    if written != tensor.nbytes:
        raise AssertionError(f"recipe for {tensor.name} produced {written} bytes, plan says {tensor.dtype} "
                             f"{list(tensor.shape)} ({tensor.nbytes} bytes)")


def _write_tensor(handle, tensor: OutputTensor, checker: FiniteCheck) -> None:
    if not needs_torch(tensor):
        return _write_array(handle, tensor, checker)
    value = tensor.recipe.compute()
    if tuple(value.shape) != tuple(tensor.shape):
        raise AssertionError(f"recipe for {tensor.name} produced shape {list(value.shape)}, plan says {list(tensor.shape)}")
    _write_value(handle, tensor, checker, value)


def _write_value(handle, tensor: OutputTensor, checker: FiniteCheck, value) -> None:
    """A computed value, checked for NaN/Inf, cast to the tensor's dtype and written."""
    import torch  # lazy: copies and numpy-computed tensors are written without torch

    with checking_output(tensor, checker) as where:
        checker.check_value(value, where)
    target = torch_dtype(tensor.dtype)
    if value.dtype != target:
        value = value.to(target)
    value = value.contiguous()
    if value.numel():
        write_all(handle, value.reshape(-1).view(torch.uint8).numpy())
