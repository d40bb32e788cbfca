"""transformers' own model for a config, with its parameters on the meta device (no memory).

Layer-by-layer execution uses transformers' modules for every computation: the embeddings, the
masks and rotary embeddings that the model's ``forward`` prepares, each decoder layer, the final
norm, the head (and any scaling the model applies). Only the loop changes: instead of one batch
through every layer, every batch through one layer. Three small stand-ins for the decoder layers
make that possible without re-implementing the model's forward:

* ``record``: the model's forward runs with recorders in place of the layers; the first recorder
  keeps the hidden states entering layer 0 and every recorder keeps the arguments the model
  passes to its layer (attention mask for that layer's type, position embeddings ...); the last
  one stops the forward, so neither the final norm nor the head runs;
* ``materialize``: a copy of one meta decoder layer receives real weights (``load_state_dict(...,
  assign=True)``), runs every batch with the recorded arguments, and is dropped;
* ``head``: the model's forward runs again with replayers in place of the layers, the last of
  which returns the stored output of the last layer, so the final norm, the head and any logit
  scaling are transformers' own.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.execution.loading import quiet_transformers


class _Stop(Exception):
    """Raised by the last recorder: the rest of the forward is not needed."""


def _layer_stand_in(inner, forward):
    """An nn.Module in place of a decoder layer; attributes the model's forward reads (e.g. the
    layer's attention type) come from the real (meta) layer."""
    return _stand_in_class()(inner, forward)


@functools.cache
def _stand_in_class():
    """The stand-in class, defined once (a class made per call would hold its closures in a reference
    cycle, and with them hidden states, until the garbage collector runs)."""
    class StandIn(torch.nn.Module):
        def __init__(self, inner, forward):
            super().__init__()
            object.__setattr__(self, "_inner", inner)
            object.__setattr__(self, "_forward", forward)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(object.__getattribute__(self, "_inner"), name)

        def forward(self, hidden_states, *args, **kwargs):
            return object.__getattribute__(self, "_forward")(hidden_states, args, kwargs)

    return StandIn


def experts_implementation(family: arch.Family, config: dict, device: str, dtype) -> str | None:
    """transformers' expert kernel: on CPU the eager per-expert loop, which takes any expert size and was as
    fast or faster than the grouped matmul on every shape measured here (3 to 128 experts, 2048-token
    batches, float32 and bfloat16: 0.25 vs 0.30 s for 3 experts of 2816 at hidden 1024); on a GPU
    transformers' own choice."""
    if family.kind != "moe" or not device.startswith("cpu"):
        return None
    return "eager"


class Skeleton:
    """The meta-device model of a config, and the three ways execution uses it."""

    def __init__(self, config: dict, family: arch.Family, device: str, dtype, label: str):
        import transformers  # lazy: transformers (seconds to import) loads when a model is built, not with the runner
        from accelerate import init_empty_weights  # lazy: as transformers

        self.family, self.device, self.dtype, self.label = family, device, dtype, label
        # the modules transformers builds are unquantized: a quantized checkpoint's weights arrive dequantized
        settings = {key: value for key, value in config.items() if key not in ("model_type", "quantization_config")}
        implementation = experts_implementation(family, config, device, dtype)
        if implementation:
            settings["experts_implementation"] = implementation
        try:
            hf_config = transformers.AutoConfig.for_model(config["model_type"], **settings)
        except (ValueError, KeyError, TypeError) as exc:
            raise SurgeryError(f"{label}: transformers cannot build this config: {str(exc).splitlines()[0][:200]}") from None
        hf_config.use_cache = False
        with init_empty_weights(include_buffers=False), quiet_transformers():
            self.model = transformers.AutoModelForCausalLM.from_config(hf_config)
        self.model.eval()
        for module in self.model.modules():  # buffers (rotary frequencies) are real: move them to the device
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(device)
        self.layers = self.model.get_submodule(arch.L.split(".{layer}")[0])
        self.templates = list(self.layers)
        self.num_layers = len(self.templates)
        self.torch = torch

    # ---------------------------------------------------------------- layers
    def expected_names(self, layer: int) -> dict[str, tuple]:
        return {name: tuple(value.shape) for name, value in self.templates[layer].state_dict().items()}

    def check_layer(self, layer: int, tensors) -> None:
        """The table's memory tensors are exactly what transformers' layer holds (names and shapes)."""
        expected = self.expected_names(layer)
        given = {tensor.name: tuple(tensor.shape) for tensor in tensors}
        if expected != given:
            missing = sorted(set(expected) - set(given))
            extra = sorted(set(given) - set(expected))
            wrong = sorted(n for n in set(expected) & set(given) if expected[n] != given[n])
            details = "; ".join(part for part in (
                f"transformers expects {', '.join(missing[:3])}" if missing else "",
                f"the table gives {', '.join(extra[:3])}" if extra else "",
                ", ".join(f"{n}: {list(given[n])} vs {list(expected[n])}" for n in wrong[:3])) if part)
            raise SurgeryError(f"{self.label}: layer {layer} does not match transformers' "
                               f"{type(self.templates[layer]).__name__} ({details})")

    def materialize(self, layer: int, state: dict, module=None):
        """A real copy of decoder layer `layer` holding `state` (names relative to the layer), or `module` (such
        a copy) given more of its weights. Weights not in `state` stay on the meta device until given."""
        module = copy.deepcopy(self.templates[layer]) if module is None else module
        unexpected = module.load_state_dict(state, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise AssertionError(f"layer {layer}: {unexpected[:3]} are not weights of the layer")
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        return module.eval()

    # ---------------------------------------------------------------- whole-model passes
    @contextlib.contextmanager
    def _with_top(self, state: dict):
        """Model-level tensors (embedding, norm, head) assigned for one pass, then meta again."""
        saved = []
        try:
            for name, value in state.items():
                module_name, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(module_name)
                saved.append((module, leaf, module._parameters[leaf]))
                module._parameters[leaf] = self.torch.nn.Parameter(value, requires_grad=False)
            yield
        finally:
            for module, leaf, parameter in reversed(saved):
                module._parameters[leaf] = parameter

    @contextlib.contextmanager
    def _with_layers(self, stand_ins):
        try:
            for index, stand_in in enumerate(stand_ins):
                self.layers[index] = stand_in
            yield
        finally:
            for index, template in enumerate(self.templates):
                self.layers[index] = template

    def record(self, embed_state: dict, batch) -> tuple:
        """(hidden states entering layer 0, [(args, kwargs) the model passes to each layer]) for one batch."""
        log: dict = {"calls": [None] * self.num_layers}

        def recorder(index):
            def forward(hidden_states, args, kwargs):
                if index == 0:
                    log["input"] = hidden_states
                log["calls"][index] = (args, kwargs)
                if index == self.num_layers - 1:
                    raise _Stop
                return hidden_states
            return forward

        stand_ins = [_layer_stand_in(template, recorder(i)) for i, template in enumerate(self.templates)]
        with self.torch.no_grad(), self._with_top(embed_state), self._with_layers(stand_ins):
            try:
                self.model(input_ids=batch.input_ids.to(self.device), attention_mask=batch.attention_mask.to(self.device),
                           use_cache=False, logits_to_keep=1)
            except _Stop:
                pass
        if "input" not in log or None in log["calls"]:
            raise SurgeryError(f"{self.label}: transformers' forward did not call every decoder layer")
        return log["input"], log["calls"]

    def head(self, top_state: dict, last_hidden, attention_mask, norm_output: list | None = None,
             norm_only: bool = False):
        """Logits of the model whose last decoder layer returned `last_hidden` ([rows, T, H] on the device).

        Gradients flow to `last_hidden` when it requires them. `norm_output`, when given, receives the
        final norm's output (the model's last hidden state); with `norm_only` the forward stops there (no
        logits: returns None, and `top_state` needs no head).
        """
        def replay(index):
            def forward(hidden_states, args, kwargs):
                return last_hidden if index == self.num_layers - 1 else hidden_states
            return forward

        stand_ins = [_layer_stand_in(template, replay(i)) for i, template in enumerate(self.templates)]
        handle = None
        if norm_output is not None:
            norm = self.model.get_submodule(self.family.spec("norm", "final_norm").name().rpartition(".")[0])
            def keep(_m, _i, output):
                norm_output.append(output)
                if norm_only:
                    raise _Stop

            handle = norm.register_forward_hook(keep)
        placeholder = self.torch.zeros(last_hidden.shape, dtype=last_hidden.dtype, device=last_hidden.device)
        try:
            with self._with_top(top_state), self._with_layers(stand_ins):
                return self.model(inputs_embeds=placeholder, attention_mask=attention_mask.to(self.device),
                                  use_cache=False).logits
        except _Stop:
            return None
        finally:
            if handle is not None:
                handle.remove()
