"""The router registry: every way surgery makes router rows, under one name and one signature.

A method is ``make(RouterRequest) -> Fitted``; ``METHODS`` names them all, with what each reads. Commands
offer a subset as their ``--router-init`` / ``--router-fit`` choices (``offered``), which builds the choice
list and its help text from the entries, so a new method is one function plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from surgery.errors import SurgeryError
from surgery.execution.routers import added_row, centroid, classifier, data_free, kmeans, ridge
from surgery.execution.routers.request import Fitted, RouterRequest
from surgery.plan.nodes import Recipe


@dataclass(frozen=True)
class RouterMethod:
    name: str
    summary: str  # what the rows are, for help texts
    reads: str  # "nothing", "weights", "router inputs", "input embeddings"
    make: Callable[[RouterRequest], Fitted]


METHODS = {method.name: method for method in (
    RouterMethod("zero", "zero rows (every expert the same logit)", "nothing", data_free.zero),
    RouterMethod("normal", "normal(0, std) rows, seeded per layer", "nothing", data_free.normal),
    RouterMethod("uniform", "uniform(+-1/sqrt(hidden)) rows, seeded per layer", "nothing", data_free.uniform),
    RouterMethod("kmeans", "k-means centroids of the router inputs on calibration text", "router inputs",
                 kmeans.kmeans),
    RouterMethod("ridge", "least squares from the router inputs onto each expert's share of the activation",
                 "router inputs", ridge.ridge),
    RouterMethod("class-mean", "centred mean router input of each expert's text, one fitted scale", "router inputs",
                 classifier.class_mean),
    RouterMethod("logistic", "logistic regression sending each text's router inputs to its expert",
                 "router inputs", classifier.logistic),
    RouterMethod("embedding", "centred mean input embedding of each expert's text", "input embeddings",
                 classifier.embedding),
    RouterMethod("centroid", "mean gate_proj direction of each expert's neurons", "weights", centroid.centroid),
    RouterMethod("added-row", "a new expert's row, winning most of its text over the existing rows",
                 "router inputs", added_row.added_row),
    RouterMethod("sigmoid-gate", "a shared expert's gate, open on its text and closed on the others",
                 "router inputs", classifier.sigmoid_gate),
)}
DATA_FREE = tuple(name for name, method in METHODS.items() if method.reads == "nothing")


def make(name: str, request: RouterRequest) -> Fitted:
    """Rows of method `name` for `request`."""
    if name not in METHODS:
        raise SurgeryError(f"router method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name].make(request)


def node(name: str, request: RouterRequest) -> Recipe:
    """The plan node of a data-free method's rows (computed when the writer writes them)."""
    if name not in DATA_FREE:
        raise AssertionError(f"router method {name} reads {METHODS[name].reads}: its rows are fitted, not planned")
    return data_free.node(name, request)


@dataclass(frozen=True)
class Offered:
    """The router choices of one command option: registry methods under their own names or an alias
    (``calibrated`` -> the method the command fits on calibration text), and choices the command decides by a rule
    of its own (``auto``)."""

    names: tuple[str, ...]  # in the order offered (click's choices)
    methods: dict  # offered name -> registry method name (None: decided by the command)
    help: str

    def method(self, name: str) -> str:
        return self.methods[name]


def offered(*names: str, **meanings: str) -> Offered:
    """Choices `names`, in order: each a registry method, or in `meanings` (``auto="..."``; a choice with a hyphen
    is not a keyword, none needs one) either the name of the registry method it stands for or, any other text, the
    rule by which the command decides it. The help text lists each choice with what its rows are."""
    methods, texts = {}, []
    for name in names:
        meaning = meanings.get(name, name)
        if meaning in METHODS:
            methods[name] = meaning
            text = METHODS[meaning].summary + ("" if meaning == name else f" ({meaning})")
        else:
            if name in METHODS or name not in meanings:
                raise AssertionError(f"{name}: no router method {meaning}")
            methods[name] = None
            text = meaning
        texts.append(f"{name}: {text}")
    return Offered(tuple(names), methods, "; ".join(texts) + ".")
