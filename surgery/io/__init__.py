"""Reading checkpoints and the files users give, from headers first and one tensor at a time.

* ``checkpoint``: a safetensors checkpoint (a directory of shards and index, or one file) opened for lazy
  reads of whole tensors, rows or byte ranges;
* ``shard_files``: a checkpoint's files opened from their headers (one file, an index and its shards), JSON files;
* ``quantized``: quantized checkpoints (FP8 block-scaled ...) read as the model they encode, one scheme a module;
* ``safetensors_format``: the file format itself: header parsing and validation, header serialisation;
* ``dtypes``: safetensors dtype names and their torch / numpy counterparts, ``--dtype`` spellings;
* ``file_io``: positioned reads and chunked writes, the step sizes every reader and writer uses;
* ``finite``: the one NaN/Inf check, for tensors, arrays and raw bytes;
* ``data_files``: calibration and evaluation data users give: UTF-8 text and token-id files.
"""
