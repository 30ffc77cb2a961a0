"""A tensor function of a Pyro program recorded once as a graph of aten operations, and compiled.

AIS evaluates the same densities and their gradients thousands of times at new latent values.
Run as written, every evaluation re-runs the program: Python, Pyro's handlers, the trace's
bookkeeping, autograd's graph building, and then some forty small kernels one at a time.
:func:`compile_function` instead records one run with ``make_fx`` (autograd's backward pass
included, as explicit operations), lifts every tensor the run read without computing it (the
module's parameters, the data, the guide's fixed parameters) to an input, and hands the graph to
``torch.compile`` (inductor), which fuses the elementwise kernels around the matrix products.
The program stays the single source of truth: the graph is what it executed, nothing re-derived.

A recorded graph is faithful as long as the program's Python does not read the value of a tensor
it computed (``if z.sum() > 0``, ``.item()``, indexing by a tensor): ``make_fx`` refuses such a
read, and the caller runs the program as written. Pyro's inverse of an autoregressive flow is
one (it indexes by the permutation's entries), so AIS from an IAF guide runs uncompiled; from
the prior (``start="prior"``) it compiles. A graph's code spells out every shape and every
Python number the run used, so two calls whose code is the same compute the same function of their lifted inputs:
they share one compiled function (:data:`CACHE_SIZE` kept per process), and a second chunk of
points of the same size costs a recording (about 0.3 s), not a compilation (seconds to a minute).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch.fx.experimental.proxy_tensor import make_fx

#: compiled graphs kept per process, by their code
CACHE_SIZE = 8
_compiled: OrderedDict[str, Callable] = OrderedDict()


class NotCompiled(Exception):
    """Why a function could not be recorded or compiled, in words for a one-line warning."""


def record(fn: Callable, *inputs: torch.Tensor) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """``fn`` at ``inputs`` as (a graph taking (*constants, *inputs), the constants it read)."""
    graph = make_fx(lambda *args: fn(*args))(*inputs)  # a plain function: make_fx counts a method's self
    constants, first = [], next(n for n in graph.graph.nodes if n.op == "placeholder")
    for node in [n for n in graph.graph.nodes if n.op == "get_attr"]:
        with graph.graph.inserting_before(first):
            lifted = graph.graph.placeholder(f"constant{len(constants)}")
        node.replace_all_uses_with(lifted)
        constants.append(getattr(graph, node.target))
        graph.graph.erase_node(node)
    graph.recompile()
    return graph, constants


def compile_function(fn: Callable, *inputs: torch.Tensor) -> Callable:
    """``fn`` (tensors in, a tuple of tensors out) as a compiled function of the same inputs, or
    :class:`NotCompiled` saying why not. ``fn`` is called once; its outputs should not need gradients
    (take them inside ``fn`` with ``torch.autograd.grad``): the compiled function runs without autograd."""
    try:
        graph, constants = record(fn, *inputs)
    except Exception as error:  # noqa: BLE001 - whatever make_fx cannot record runs as written (and fails there if it must)
        if "data-dependent" in str(error) or "_local_scalar_dense" in str(error):
            raise NotCompiled("its Python reads the value of a tensor it computed (control flow or indexing on a tensor)") from error
        raise NotCompiled(f"recording it failed: {_first_line(error)}") from error
    key = graph.code
    if key not in _compiled:
        compiled = torch.compile(graph, fullgraph=True, dynamic=False)
        try:
            with torch.no_grad(), _quiet("torch.utils.cpp_extension"):  # "No CUDA runtime is found": says nothing here
                compiled(*constants, *inputs)  # compiles now, so that a failure is reported here
        except Exception as error:  # noqa: BLE001 - any compiler failure (no C++ compiler, ...) falls back
            raise NotCompiled(f"torch.compile failed: {_first_line(error)}") from error
        _compiled[key] = compiled
        while len(_compiled) > CACHE_SIZE:
            _compiled.popitem(last=False)
    _compiled.move_to_end(key)
    return functools.partial(_run, _compiled[key], constants)


def _run(compiled: Callable, constants: list[torch.Tensor], *inputs: torch.Tensor):
    with torch.no_grad():
        return compiled(*constants, *inputs)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Logger ``name`` silenced below ERROR for the duration."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
