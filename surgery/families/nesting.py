"""Checkpoints that nest a text model inside a multimodal one, as data: which wrapper, where the text config and
weights sit inside it, and which tensors belong to the other towers.

Llama-4-Scout and Qwen3.5 MoE are published as their multimodal classes (Llama4ForConditionalGeneration,
Qwen3_5MoeForConditionalGeneration): the text model's config nested under ``text_config``, its weights under a
prefix (``language_model.``, ``model.language_model.``), a vision tower beside it. A text family module declares
its ``NESTING`` beside its ``FAMILY``; ``surgery.io.checkpoint`` then opens such a checkpoint as the text model it
holds (the text config, the text model's own tensor names) with the other towers' tensors carried, and the writer
nests an output again (``nest_config``, ``stored_name``), the carried tensors copied as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError


@dataclass(frozen=True)
class Nesting:
    architecture: str  # the wrapper's class in config.architectures (Llama4ForConditionalGeneration)
    model_type: str  # the wrapper's model_type (llama4)
    text: str  # the text family's name (llama4_text)
    # (stored prefix, the text model's prefix), first match wins: ("language_model.", "") for Llama 4,
    # ("model.language_model.", "model.") for Qwen3.5; a stored name under none of them and not carried is left as is
    renames: tuple[tuple[str, str], ...] = ()
    carried: tuple[str, ...] = ()  # stored prefixes of the other towers' tensors: copied as bytes, never read
    config_key: str = "text_config"

    def view_name(self, stored: str) -> str:
        """The text model's name of stored tensor `stored`."""
        for outer, inner in self.renames:
            if stored.startswith(outer):
                return inner + stored[len(outer):]
        return stored

    def stored_name(self, name: str) -> str:
        """The stored name of the text model's tensor `name` (the inverse of ``view_name``)."""
        for outer, inner in self.renames:
            if name.startswith(inner) and self.view_name(outer + name[len(inner):]) == name:
                return outer + name[len(inner):]
        return name

    def is_carried(self, stored: str) -> bool:
        return stored.startswith(self.carried) if self.carried else False

    def text_config(self, config: dict, text_architecture: str, where: Path | str) -> dict:
        """The text model's config: the nested one, with the text class as its architecture."""
        inner = config.get(self.config_key)
        if not isinstance(inner, dict):
            raise SurgeryError(f"{where}: a {self.architecture} config needs a {self.config_key!r} object (the text "
                               f"model's config), found {type(inner).__name__}")
        return {**inner, "architectures": [text_architecture]}

    def nest_config(self, outer: dict, text: dict) -> dict:
        """`outer` (the source's whole config) with the text model's config `text` nested again."""
        inner = {key: value for key, value in text.items() if key != "architectures"
                 or "architectures" in (outer.get(self.config_key) or {})}
        # the weights' dtype is said at both levels: a copy --dtype changes both
        mirrored = {key: inner[key] for key in ("dtype", "torch_dtype") if key in outer and key in inner}
        return {**outer, **mirrored, self.config_key: inner}
