"""Run only what the asked tasks need: one pruned ONNX graph per subset of outputs, made on demand.

ONNX Runtime executes every node of a session's graph whatever outputs a call fetches (measured:
fetching one of four independent branches costs as much as fetching all four; see BENCHMARKS.md
"Pay only for the tasks you ask for"). So a subset gets its own graph: the nodes the asked outputs
depend on, cut out of the bundle's graph with ``onnx.utils.Extractor``, and the caller builds a
session over it. Shared blocks appear once in such a graph, so its MACs are the subset's real
cost, counted by the same counter as the manifest's.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable

import onnx
import onnx.utils

from taskfold.runtime.errors import InputError
from taskfold.runtime.flops import count_onnx


class SubsetGraphs:
    """The bundle's graph and its pruned sub-graphs, keyed by the set of outputs they compute.

    ``load_graph`` is called once, on first use (a predictor that is only ever asked for every
    task never parses its graph a second time). Thread-safe: a server may ask from several threads.
    """

    def __init__(self, load_graph: Callable[[], onnx.ModelProto]) -> None:
        self._load_graph = load_graph
        self._full: onnx.ModelProto | None = None
        self._graphs: dict[frozenset[str], onnx.ModelProto] = {}
        self._macs: dict[frozenset[str], int] = {}
        self._lock = threading.Lock()

    @property
    def full(self) -> onnx.ModelProto:
        with self._lock:
            return self._full_graph()

    def _full_graph(self) -> onnx.ModelProto:
        if self._full is None:
            self._full = self._load_graph()
        return self._full

    def graph(self, outputs: Iterable[str]) -> onnx.ModelProto:
        """The sub-graph computing exactly ``outputs`` (the full graph when they are all of them)."""
        key = frozenset(outputs)
        with self._lock:
            if key not in self._graphs:
                self._graphs[key] = extract_outputs(self._full_graph(), key)
            return self._graphs[key]

    def macs(self, outputs: Iterable[str]) -> int:
        """MACs of the sub-graph computing ``outputs``: shared nodes once, unrequested branches not at all."""
        key = frozenset(outputs)
        graph = self.graph(key)
        with self._lock:
            if key not in self._macs:
                self._macs[key] = int(count_onnx(graph).macs)
            return self._macs[key]


def extract_outputs(model: onnx.ModelProto, outputs: Iterable[str]) -> onnx.ModelProto:
    """The nodes, initializers and inputs that ``outputs`` depend on, as a model of its own.

    Graph outputs keep the model's order; the model itself is returned when every output is asked.
    """
    wanted = set(outputs)
    names = [o.name for o in model.graph.output]
    unknown = sorted(wanted - set(names))
    if unknown:
        raise InputError(f"the graph has no output(s) {', '.join(unknown)}; it has {', '.join(names)}")
    if wanted == set(names):
        return model
    inputs = [i.name for i in model.graph.input]
    return onnx.utils.Extractor(model).extract_model(inputs, [n for n in names if n in wanted])
