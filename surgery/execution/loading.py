"""Loading a checkpoint with transformers, strictly: no missing, unexpected or mismatched key.

transformers 5 silently initialises misnamed or missing weights at random; a surgery result that
loads that way is garbage that looks fine. Every load goes through ``load_model``, which asks for
the loading info and refuses any key problem, never trusts remote code, and never goes online.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from surgery import console
from surgery.errors import SurgeryError
from surgery.families import detect_family
from surgery.io.checkpoint import Checkpoint
from surgery.process_memory import bound_process_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TORCH_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def resolve_dtype(dtype: str, device: str):
    import torch  # lazy: reading tokenizers and paths needs no torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in TORCH_DTYPES:
        raise SurgeryError(f"dtype {dtype!r} is not supported (expected auto, float32, bfloat16, float16)")
    return getattr(torch, TORCH_DTYPES[dtype])


def load_model(path, device: str = "cpu", dtype="float32", device_map=None):
    """AutoModelForCausalLM from a local directory, refusing any key problem. Returns the model in eval mode."""
    import torch  # lazy: reading tokenizers and paths needs no torch
    import transformers  # lazy: as torch


    path = Path(path)
    with Checkpoint.open(path, require_config=True) as checkpoint:  # our own checks first: clear errors
        family = detect_family(checkpoint.config, checkpoint.directory / "config.json")
        # multi-token-prediction layers are not part of transformers' model: skipped, as hub checkpoints' are
        # (under the names transformers converts them to)
        mtp = tuple(family.mtp_prefixes({**family.defaults, **checkpoint.config})) if family.mtp_prefixes else ()
        # a multimodal checkpoint loads as its text model (AutoModelForCausalLM): the other towers are not part of it
        skipped = mtp + (checkpoint.nesting.carried if checkpoint.nesting is not None else ())
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    kwargs = dict(output_loading_info=True, dtype=torch_dtype, trust_remote_code=False, local_files_only=True)
    if device == "cpu":
        # The default grouped matmul fails on CPU for expert sizes that are not multiples of 8 in bf16.
        kwargs["experts_implementation"] = "eager"
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with quiet_transformers():
            try:
                model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            except TypeError as exc:
                if "experts_implementation" not in str(exc):
                    raise
                kwargs.pop("experts_implementation")
                model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: its loading report (a conversion)
        raise SurgeryError(f"{path}: transformers cannot load it: {str(exc).splitlines()[0][:300]}") from None
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(str(k) for k in (info.get(key) or [])
                       if key != "unexpected_keys" or not (skipped and str(k).startswith(skipped)))
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            problems.append(f"{key.replace('_', ' ')}: {shown}")
    if problems:
        raise SurgeryError(f"{path}: transformers would load this checkpoint with random weights ({'; '.join(problems)})")
    if device_map is None:
        model = model.to(device)
    return model.eval()


def tower_shapes(config: dict, prefixes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors under `prefixes` of the model config.json `config` describes (a multimodal
    model's vision tower), from transformers' own class built on the meta device: no memory, no weights."""
    import torch  # lazy: as load_model
    import transformers  # lazy: as torch

    settings = {key: value for key, value in config.items() if key not in ("model_type", "architectures")}
    try:
        with quiet_transformers(always=True):
            built = transformers.AutoConfig.for_model(config["model_type"], **settings)
            model_class = getattr(transformers, (config.get("architectures") or [""])[0], None)
            if model_class is None:
                raise ValueError(f"transformers has no class {config.get('architectures')}")
            with torch.device("meta"):
                model = model_class._from_config(built)
    except (ValueError, TypeError, KeyError) as exc:
        raise SurgeryError(f"config.json: transformers cannot build {config.get('architectures')} to size its other "
                           f"towers: {str(exc).splitlines()[0][:200]}") from None
    return {name: tuple(value.shape) for name, value in model.state_dict().items() if name.startswith(prefixes)}


def has_tokenizer(path) -> bool:
    """Whether the checkpoint directory holds tokenizer files."""
    return any((Path(path) / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


@contextlib.contextmanager
def quiet_transformers(always: bool = False):
    """transformers' own progress bars ("Loading weights") and warnings stay out of our output, unless -v
    (`always`: also with -v, for a warning that is wrong for us)."""
    import transformers  # lazy: as torch


    if console.VERBOSITY["level"] >= 1 and not always:
        yield
        return
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer(path):
    """The checkpoint's own tokenizer (offline), or None when it has no tokenizer files."""
    path = Path(path)
    if not has_tokenizer(path):
        return None
    import transformers  # lazy: as torch

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"{path}: tokenizer cannot be loaded: {str(exc).splitlines()[0][:200]}") from None


def import_in_background(model_type: str):
    """Start importing transformers' modeling code for `model_type` (seconds of Python import) in a daemon
    thread, so a run that first writes a draft has it ready when it starts the model. The thread only
    warms the import cache: any failure is left for the real import to report. Returns the thread."""
    bound_process_memory()  # before the thread allocates: one malloc arena for the process

    def work():
        try:
            import transformers  # lazy: importing it, in this thread, is the point

            config = transformers.AutoConfig.for_model(model_type)
            transformers.AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module
        except Exception:  # noqa: BLE001 - the real import reports it
            pass

    thread = threading.Thread(target=work, name="surgery-import", daemon=True)
    thread.start()
    return thread
