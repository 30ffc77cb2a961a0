"""A tensor function of a Pyro program recorded once as a graph of aten operations, and compiled.

Three callers: a training step's loss and gradients (:mod:`pyvae.train.step`), a chunk of
importance sampling's log-weights (:class:`pyvae.infer.importance.Scorer`) and AIS's densities
(:mod:`pyvae.infer.ais.potential`). AIS evaluates the same densities and their gradients
thousands of times at new latent values.
Run as written, every evaluation re-runs the program: Python, Pyro's handlers, the trace's
bookkeeping, autograd's graph building, and then some forty small kernels one at a time.
:func:`compile_function` instead records one run with ``make_fx`` (autograd's backward pass
included, as explicit operations), lifts every tensor the run read without computing it (the
data, the guide's fixed parameters; the module's parameters too, except on a CPU, below) to an
input, and hands the graph to inductor (``torch._inductor.compile``: ``torch.compile``'s
compiler without its Python guards, which a graph of known inputs does not need), which fuses the
elementwise kernels around the matrix products.
The program stays the single source of truth: the graph is what it executed, nothing re-derived.
On a CPU the model's weights are compiled in as constants (inductor's freezing) and max-autotune
times its own packed matrix-product kernels against MKL's for each product, keeping the faster:
on the default model its kernels win for the decoder's large layers and the elementwise work
around them is fused in (AIS 1.1-1.3x faster than compiled without it; ``benchmarks/RESULTS.md``).
The price is a longer one-off compilation (15-35 s instead of 3-13 s per graph) and a compiled
function tied to the weights' values: it is compiled again when they change in place (by a training
step). Also on a CPU, ``log1p`` is recorded as Kahan's formula from ``log`` (:func:`log1p`), and the
ops that inductor would expand into a ``log1p`` (softplus, log-sigmoid, the Bernoulli log-mass,
logaddexp) are expanded at the recording so that theirs is too (others, such as mish, keep ATen's):
ATen's vectorized ``log1p`` on a CPU is about ten times slower than its ``log``, and on the default
model the decoder's softplus and the likelihood's log-mass spent a third of each evaluation in it.
The expansions act below autograd, on the values only: the gradients' formulas are the ops' own.

The recording runs the function on fake inputs (shapes and dtypes, no data), so a graph cannot
freeze a value computed from them: a Python decision on one (``if z.sum() > 0``, ``float(z)``,
``.tolist()``, ``.numpy()``, ``len(z[mask])``) raises, :class:`NotCompiled` says so, and the
caller runs the program as written. (An ``.item()`` or a mask's ``.shape`` that only feeds tensor
arithmetic is recorded symbolically, which is faithful.) Pyro's inverse of an autoregressive flow
decides by its permutation's entries, so AIS from an IAF guide runs uncompiled; from the prior
(``start="prior"``) it compiles. Tensors the function reads without computing them (parameters,
data) are real and may be read freely: they are the recording's constants, passed again on
every call. Two recordings with the same code (every view's shape and Python number written
out), the same inputs' shapes, strides and dtypes and the same frozen weights share one compiled
function (:data:`CACHE_SIZE` kept per process), so a second chunk of points of the same size
costs a recording (about 0.3 s; AIS makes two), not a compilation.

A function that draws random numbers (a guide's reparameterized ``loc + scale * eps``) has each
draw replaced by an input (:func:`lift_noise`), drawn on every call by the same torch ops, in the
same order, from torch's generators (:class:`Noise`): compiled or not, a seeded call gives the same
numbers, and the graph holds no generator of its own (inductor's would draw other numbers; a CUDA
graph cannot hold one). Noise shaped like a computed tensor (dropout's
``empty_like(x).bernoulli_(p)`` on a CPU) is drawn on an empty tensor of that layout. A draw whose
distribution is computed (a Gamma's ``_standard_gamma`` of a computed shape, a Categorical's
``multinomial``), one made in place into a view, and a draw from Python's or numpy's generators
(which the recording would freeze) cannot be made apart: :class:`NotCompiled`. What the recording
and the compiled function's first call do to a module they run is undone (:func:`untouched`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import operator
import random
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator

import numpy as np
import torch
import torch._inductor.config
from torch._decomp import get_decompositions
from torch._inductor.codecache import PyCodeCache
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from pyvae.errors import PyvaeError

#: compiled graphs kept per process (AIS compiles two per chunk size), by their code, their inputs'
#: layouts and their frozen tensors (:func:`fingerprint`)
CACHE_SIZE = 16
#: distinct sets of frozen weights whose compiled functions are kept (:func:`_evict`)
FROZEN_SETS = 2
_compiled: OrderedDict[tuple, Callable] = OrderedDict()
#: the Python modules inductor loaded for each of them
_loaded: dict[tuple, list] = {}
#: whether this torch's inductor can be told not to reassociate float arithmetic (:func:`log1p`
#: needs it)
_EXACT_MATH = hasattr(torch._inductor.config.cpp, "enable_unsafe_math_opt_flag")
#: inductor's settings on a CPU: the frozen tensors (the weights) become constants of the code, so
#: that max-autotune may pack them for its own matrix-product kernels (on the default model 1.6x
#: faster than MKL's for the decoder's layers) and fuse the elementwise work into them; its tables
#: kept off stderr; float arithmetic kept as written
CPU_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
    **({"cpp.enable_unsafe_math_opt_flag": False} if _EXACT_MATH else {}),
}
#: inductor's settings on a CPU without frozen weights (a training step): float arithmetic kept as
#: written, which :func:`log1p` needs
EXACT_OPTIONS = {"cpp.enable_unsafe_math_opt_flag": False} if _EXACT_MATH else {}


def log1p(x: torch.Tensor) -> torch.Tensor:
    """log(1 + x) from ``log`` by Kahan's trick (Goldberg 1991, Theorem 4): with u = 1 + x rounded,
    log(u) * x / (u - 1) cancels the rounding of u (u - 1 is exact while u < 2^24; beyond, the
    rounding does no harm), and where u rounds to 1, log1p(x) is x to within an ulp. Within 1.5 eps
    of float64's log1p over every float32 (subnormals included, which ATen's rounds to 0); 0, -1,
    below -1, inf, -inf and nan as ``torch.log1p``. It rests on the compiler not rewriting
    (1 + x) - 1 as x: inductor's default flags forbid it, and :data:`CPU_OPTIONS` pins them."""
    u = 1 + x
    d = u - 1
    return torch.where(d == 0, x, torch.where(u == math.inf, u, torch.log(u) * (x / d)))


_aten = torch.ops.aten
#: the recording's expansions on a CPU (see the module's docstring): ops into whose ``log1p``
#: inductor would expand them, by torch's own decompositions, and ``log1p`` itself by :func:`log1p`;
#: none where the compiler's float arithmetic cannot be kept as written
CPU_DECOMPOSITIONS = (
    {
        **get_decompositions(
            [
                _aten.softplus,
                _aten.log_sigmoid_forward,
                _aten.binary_cross_entropy_with_logits,
                _aten.logaddexp,
            ]
        ),
        _aten.log1p.default: log1p,
    }
    if _EXACT_MATH
    else {}
)


#: what ``compile`` accepts (training, importance sampling): compile when it pays (``auto``),
#: always (``on``), never (``off``)
COMPILE_CHOICES = ("auto", "on", "off")


def check_compile(value) -> str:
    """``value`` if it is one of :data:`COMPILE_CHOICES`, else a :class:`PyvaeError`."""
    if value not in COMPILE_CHOICES:
        raise PyvaeError(f"unknown compile {value!r}; choose from {', '.join(COMPILE_CHOICES)}")
    return value


def describe(value) -> tuple:
    """What a recording depends on of one argument: a tensor's shape, strides, dtype and device
    (:func:`_layout`: what its compiled code assumes), anything else itself (it is a constant of
    the recording)."""
    if isinstance(value, torch.Tensor):
        return _layout(value)
    return (value,)


def _layout(value: torch.Tensor) -> tuple:
    """What code compiled for ``value`` assumes of it (the compiled code has no guards)."""
    return tuple(value.shape), value.stride(), value.dtype, value.device


class Recordings:
    """Compiled functions by kind (a key of what a recording depends on), each recorded the second
    time its kind comes: the first call runs as written (a kind that comes once costs no
    compilation). Every kind runs as written when compilation is not ``wanted``, and once a
    recording failed (:class:`NotCompiled`: a program that cannot be recorded), which
    ``failed(why)`` is told once."""

    def __init__(self, wanted: bool, failed: Callable[[NotCompiled], None]) -> None:
        self.compiled: dict[tuple, Callable | None] = {}
        self.seen: Counter = Counter()
        self.off, self.failed = not wanted, failed

    def get(self, key: tuple, record: Callable[[], Callable]) -> Callable | None:
        """The compiled function of ``key``, made by ``record()`` the second time ``key`` comes;
        None: run it as written."""
        if key not in self.compiled and not self.off:
            self.seen[key] += 1
            if self.seen[key] >= 2:
                self.compiled[key] = self._recorded(record)
        return self.compiled.get(key)

    def _recorded(self, record: Callable[[], Callable]) -> Callable | None:
        try:
            return record()
        except NotCompiled as why:
            self.off = True
            self.failed(why)
            return None


class Watched:
    """What a recording of ``module`` depends on besides its arguments, for a key checked before
    each call (a few microseconds): which tensors its parameters and buffers are (a recording reads
    them by identity: one replaced, not updated in place, needs a new recording), which parameters
    are trainable and which submodules it has, all checked at every call; the values of every
    submodule's Python settings (train/eval mode, numbers, strings: a program whose code branches
    on ``self.temperature`` is recorded again when it changes); which tensors its other tensor
    attributes are (``self.mask``, a plain attribute that is not a buffer), listed again by
    :meth:`refresh` (each epoch), and by :meth:`key` when a module gains or loses an attribute."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.refresh()

    def refresh(self) -> None:
        """List the trainable parameters and the settings anew."""
        self.modules = list(self.module.modules())
        self.all_params = list(self.module.parameters())
        self.params = [p for p in self.all_params if p.requires_grad]
        self.settings = [
            (module, name)
            for module in self.modules
            for name, value in vars(module).items()
            if value is None or isinstance(value, (bool, int, float, str))
        ]
        self.sizes = self._sizes()
        self.holders = [d for m in self.modules for d in _members_of(m)]
        self.members = self._members()
        self.trainable = [p.requires_grad for p in self.all_params]
        attributes = [v for m in self.modules for _, v in _public_tensors(m)]
        self.listed = (
            tuple(map(id, self.members)),
            tuple(self.trainable),
            tuple(name for _, name in self.settings),
            tuple(map(id, attributes)),
        )

    def _sizes(self) -> tuple[int, ...]:
        return tuple(len(vars(module)) for module in self.modules)

    def _members(self) -> list:
        """The parameters, buffers and submodules the modules hold now."""
        return [v for held in self.holders for v in held.values()]

    def _changed(self) -> bool:
        """Whether a module gained or lost an attribute, holds another parameter, buffer or
        submodule, or a parameter was made trainable or frozen."""
        members = self._members()
        return (
            self._sizes() != self.sizes
            or len(members) != len(self.members)
            or not all(map(operator.is_, members, self.members))
            or [p.requires_grad for p in self.all_params] != self.trainable
        )

    def key(self) -> tuple:
        """The tensors' identities, the settings' names and their values now."""
        if self._changed():
            self.refresh()
        values = tuple(_setting(vars(module).get(name)) for module, name in self.settings)
        return self.listed, values


def _setting(value):
    """A setting's value as a key: itself if a Python number, string or None; for anything else
    (an unset cache that got filled) only that it is set."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else object


@contextlib.contextmanager
def untouched(module: torch.nn.Module) -> Iterator[None]:
    """``module`` left as it was by what runs inside: a recording runs the program once, and the
    compiled function's trial call a step, neither of which is one. Attributes set or replaced get
    their values back, and tensors updated in place (BatchNorm's running statistics, a counter
    kept in a plain attribute) their values. A tensor the program stored in a public attribute
    (``self.last_norm = loc.norm()``) is :class:`NotCompiled`: compiled, the program would never
    store it again. (Caches a module keeps in private attributes, as Pyro's transforms keep their
    last ``(x, y)``, and what a forward pre-hook recomputes before every forward, as
    ``weight_norm``'s ``weight``, are only put back.)"""
    modules = list(module.modules())
    before = [(m, dict(vars(m)), *(dict(d) for d in _members_of(m))) for m in modules]
    tensors = {id(t): t for t in module.buffers()}
    tensors.update((id(t), t) for m in modules for _, t in _public_tensors(m))
    values = [(t, t._version, t.detach().clone()) for t in tensors.values() if not t.is_inference()]
    try:
        yield
    finally:
        stored = [
            f"{type(m).__name__}.{name}"
            for m, attributes, *_ in before
            for name, value in _public_tensors(m)
            if attributes.get(name) is not value
        ]
        _restore(before, values)
    if stored:
        raise NotCompiled(
            f"it stores a tensor it computed on its module ({stored[0]}), which a compiled step "
            "would not store again"
        )


def _public_tensors(m: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``m``'s plain tensor attributes that are its program's: not private (a module's caches, as
    Pyro's coupling layers keep their last scale), and not set by its forward pre-hooks before
    every forward (``weight_norm``'s and ``spectral_norm``'s hooks name theirs)."""
    hooked = {getattr(hook, "name", None) for hook in m._forward_pre_hooks.values()}
    return [
        (name, value)
        for name, value in vars(m).items()
        if torch.is_tensor(value) and not name.startswith("_") and name not in hooked
    ]


def _members_of(m: torch.nn.Module) -> tuple[dict, dict, dict]:
    return m._parameters, m._buffers, m._modules


def _restore(before: list, values: list) -> None:
    """Put back what :func:`untouched` saw."""
    for m, attributes, *members in before:
        for held, saved in zip(_members_of(m), members, strict=True):
            held.clear()
            held.update(saved)
        vars(m).clear()
        vars(m).update(attributes)
    with torch.no_grad():
        for tensor, version, value in values:
            if tensor._version != version:
                tensor.copy_(value)


class NotCompiled(Exception):
    """Why a function could not be recorded or compiled, in words for a one-line warning."""


def record(
    fn: Callable,
    *inputs: torch.Tensor,
    keep: Collection[torch.Tensor] = (),
    decompositions: dict | None = None,
) -> tuple[torch.fx.GraphModule, list[torch.Tensor], Noise]:
    """``fn`` at ``inputs`` as (a graph taking (*constants, *noise, *inputs), the constants it read,
    its :class:`Noise`); the tensors in ``keep`` (by identity) that it read stay attributes of the
    graph instead; the ops in ``decompositions`` recorded as what it maps them to."""
    # fake mode: the inputs are recorded as values without data, so a Python decision on anything
    # computed from them (float(), .tolist(), .numpy(), len() of a mask) cannot be frozen into the
    # graph: it raises
    traced = make_fx(
        lambda *args: fn(*args),  # a plain function: make_fx counts a method's self
        decomposition_table=decompositions,
        tracing_mode="fake",
        _allow_non_fake_inputs=True,
    )
    python, numpy = random.getstate(), np.random.get_state()
    graph = traced(*inputs)
    if random.getstate() != python or not _same_numpy_state(np.random.get_state(), numpy):
        random.setstate(python)  # as if nothing had been recorded
        np.random.set_state(numpy)
        raise NotCompiled(
            "it draws from Python's or numpy's random generator, whose draws a recording would "
            "freeze into constants"
        )
    first = next(n for n in graph.graph.nodes if n.op == "placeholder")
    lifted: dict[str, torch.fx.Node] = {}
    kept = {id(t) for t in keep}
    for node in [
        n
        for n in graph.graph.nodes
        if n.op == "get_attr" and id(getattr(graph, n.target)) not in kept
    ]:
        if node.target not in lifted:
            with graph.graph.inserting_before(first):
                lifted[node.target] = graph.graph.placeholder(f"constant{len(lifted)}")
        node.replace_all_uses_with(lifted[node.target])
        graph.graph.erase_node(node)
    constants = [getattr(graph, target) for target in lifted]
    for target in lifted:
        delattr(graph, target)  # a cached graph must not keep this chunk's tensors alive
    noise = lift_noise(graph.graph, first)
    graph.recompile()
    return graph, constants, noise


def _same_numpy_state(a: tuple, b: tuple) -> bool:
    """Whether two of numpy's legacy generator states are the same (its keys are an array)."""
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


class Noise:
    """The random draws of a recording, made again as the function made them: the same ops with
    the same shapes, in the same order, from torch's generators. The compiled function takes them
    as inputs, so its draws are the function's own (a seeded run draws the same numbers compiled
    or not, and a resumed run the same as an uninterrupted one), and the compiled graph holds no
    generator of its own (what a CUDA graph needs)."""

    def __init__(self, graph: torch.fx.Graph | None = None) -> None:
        self.module = None if graph is None else torch.fx.GraphModule(torch.nn.Module(), graph)

    def __call__(self) -> tuple[torch.Tensor, ...]:
        return () if self.module is None else self.module()

    def layouts(self) -> tuple:
        """The draws' shapes, strides, dtypes and devices, as recorded (nothing drawn)."""
        if self.module is None:
            return ()
        (drawn,) = self.module.graph.output_node().args
        return tuple(_layout(node.meta["val"]) for node in drawn)


def _is_random(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(
        node.target, "tags", ()
    )


def lift_noise(graph: torch.fx.Graph, before: torch.fx.Node) -> Noise:
    """Replace every random op of ``graph`` by an input (placed before ``before``), and return the
    :class:`Noise` that draws them. A draw whose arguments are computed from the function's inputs
    (a Gamma's, whose shape parameter the guide computes) cannot be made apart from it:
    :class:`NotCompiled`."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    noise, copies, drawn = torch.fx.Graph(), {}, []
    for i, node in enumerate([n for n in graph.nodes if _is_random(n)]):
        needed = _ancestors(node)
        if any(n.op != "call_function" for n in needed):
            raise NotCompiled(
                f"it draws noise ({node.target}) whose distribution it computes: only noise of "
                "fixed shape (Normal, Uniform, ... reparameterized draws) can be an input"
            )
        mutable = node.target._schema.is_mutable
        if mutable and _is_view(node.args[0]):
            raise NotCompiled(
                f"it draws noise ({node.target}) in place into a view of a tensor, whose other "
                "readers an input would not reach"
            )
        for n in sorted(needed, key=order.__getitem__):
            if n not in copies:
                copies[n] = _copy(noise, n, copies)
        drawn.append(copies[node])
        with graph.inserting_before(before):
            placeholder = graph.placeholder(f"noise{i}")
        if mutable:  # x.normal_(): x's later readers read the draw
            node.args[0].replace_all_uses_with(placeholder)
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
    for node in reversed([n for n in graph.nodes if n in copies and not n.users]):
        graph.erase_node(node)  # the draws' empty tensors
    if not drawn:
        return Noise()
    noise.output(tuple(drawn))
    return Noise(noise)


#: ops that read only their first argument's layout (shape, strides, dtype, device), never its
#: values: ``torch.empty_like(x).bernoulli_(p)`` (dropout) draws noise of a fixed distribution
_LAYOUT_ONLY = frozenset(
    op.default
    for op in (
        _aten.empty_like,
        _aten.zeros_like,
        _aten.ones_like,
        _aten.full_like,
        _aten.rand_like,
        _aten.randn_like,
        _aten.new_empty,
        _aten.new_empty_strided,
        _aten.new_zeros,
        _aten.new_ones,
        _aten.new_full,
    )
)


def _value_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes whose values ``node`` reads."""
    if node.target in _LAYOUT_ONLY:
        return [n for n in node.all_input_nodes if n is not node.args[0]]
    return node.all_input_nodes


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """``node`` and every node whose values it is computed from."""
    found, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in found:
            found.add(n)
            stack.extend(_value_inputs(n))
    return found


def _copy(noise: torch.fx.Graph, node: torch.fx.Node, copies: dict) -> torch.fx.Node:
    """``node`` copied into ``noise``; a layout-only op's template stands in as an empty tensor of
    the same layout, so that the draw is made by the same op on the same layout."""
    if node.target not in _LAYOUT_ONLY:
        return noise.node_copy(node, copies.__getitem__)
    like = node.args[0].meta["val"]
    template = noise.call_function(
        _aten.empty_strided.default,
        (list(like.shape), list(like.stride())),
        {"dtype": like.dtype, "device": like.device},
    )
    return noise.node_copy(node, lambda n: template if n is node.args[0] else copies[n])


def _is_view(node) -> bool:
    """Whether ``node`` is an aten view of another tensor (its output aliases an input)."""
    schema = getattr(getattr(node, "target", None), "_schema", None)
    return schema is not None and any(
        r.alias_info is not None and not r.alias_info.is_write for r in schema.returns
    )


def compile_function(
    fn: Callable,
    *inputs: torch.Tensor,
    module: torch.nn.Module | None = None,
    frozen: Collection[torch.Tensor] = (),
    autotune: bool = True,
) -> Compiled:
    """``fn`` (tensors in, a tuple of tensors out) as a compiled function of the same inputs, or
    :class:`NotCompiled` saying why not. ``fn`` is called once; its outputs should not need
    gradients (take them inside ``fn`` with ``torch.autograd.grad``): the compiled function runs
    without autograd. Its random draws are made as ``fn`` made them (:class:`Noise`). The
    ``module`` that ``fn`` runs is left as it was (:func:`untouched`): neither that call nor the
    compiled function's trial call is one of the program's runs.

    On a CPU the tensors in ``frozen`` that ``fn`` reads (a model's parameters) are compiled in as
    constants and, with ``autotune``, max-autotune picks the matrix-product kernels
    (:data:`CPU_OPTIONS`): the function is then one of those tensors' values, and is compiled again
    for other tensors or once they change in place (a training step); and ``log1p`` is computed
    from ``log`` (:data:`CPU_DECOMPOSITIONS`). A training step freezes nothing and does not
    autotune: its weights change every step, and the tuning would cost more than it saves."""
    cpu = inputs[0].device.type == "cpu"
    with untouched(module) if module is not None else contextlib.nullcontext():
        graph, constants, noise = _record(fn, inputs, frozen if cpu else (), cpu)
        attributes = [getattr(graph, n.target) for n in graph.graph.nodes if n.op == "get_attr"]
        key = (
            graph.code,
            tuple(_layout(t) for t in (*constants, *inputs)),
            noise.layouts(),
            autotune,
            fingerprint(attributes),
        )
        if key not in _compiled:
            options = (CPU_OPTIONS if autotune else EXACT_OPTIONS) if cpu else {}
            loaded = len(getattr(PyCodeCache, "modules", ()))
            _compiled[key] = _compile(graph, constants, noise, inputs, options)
            _loaded[key] = list(getattr(PyCodeCache, "modules", ())[loaded:])
    _compiled.move_to_end(key)
    _evict()
    return Compiled(_compiled[key], constants, noise)


def _evict() -> None:
    """Keep :data:`CACHE_SIZE` compiled functions, and of those that froze weights in only the
    ones of the :data:`FROZEN_SETS` weights used last: each holds its weights and their packed
    copies, and weights seen once (a checkpoint evaluated) seldom come back. Inductor's own
    cache of the code it loaded lets go of them too (it keeps every module, constants and all)."""
    evicted = []
    while len(_compiled) > CACHE_SIZE:
        evicted.append(_compiled.popitem(last=False)[0])
    groups: list[set] = []  # weights, the most recently used first: graphs sharing any are one
    for key in reversed(_compiled):
        frozen = set(key[-1])
        if not frozen:
            continue
        rank = next((i for i, group in enumerate(groups) if group & frozen), len(groups))
        if rank == len(groups):
            groups.append(set())
        groups[rank] |= frozen
        if rank >= FROZEN_SETS:
            evicted.append(key)
    for key in evicted:
        _forget(_loaded.pop(key, []))
        _compiled.pop(key, None)


def _forget(modules: list) -> None:
    """Drop inductor's references to the Python modules it loaded for one compilation: its list of
    loaded modules and ``sys.modules``. (Whoever still calls the compiled function keeps it.)"""
    kept = getattr(PyCodeCache, "modules", None)
    if kept is None:
        return
    ids = {id(m) for m in modules}
    kept[:] = [m for m in kept if id(m) not in ids]
    for module in modules:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]


def fingerprint(tensors: Iterable[torch.Tensor]) -> tuple:
    """Which tensors these are and what they hold: identities, versions and a digest of their
    bytes (a change through ``.data``, as an EMA or ``vector_to_parameters`` makes, keeps the
    version). A key of what a compiled function froze in."""
    return tuple((id(t), None if t.is_inference() else t._version, _digest(t)) for t in tensors)


def _digest(t: torch.Tensor) -> bytes | None:
    """A digest of a dense CPU tensor's bytes; None elsewhere: on a GPU nothing is frozen in (the
    compiled functions read the tensors at every call) and reading them back would cost a copy."""
    if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
        return None
    data = t.detach().resolve_conj().resolve_neg().reshape(-1).contiguous().view(torch.uint8)
    return hashlib.blake2b(data.numpy(), digest_size=16).digest()


class Compiled:
    """A compiled recording and what it is called with besides the inputs: the ``constants`` it
    read (the same tensors each call, so it reads their current values) and its ``noise``."""

    def __init__(self, compiled: Callable, constants: list[torch.Tensor], noise: Noise) -> None:
        self.compiled, self.constants, self.noise = compiled, constants, noise

    def __call__(self, *inputs: torch.Tensor):
        with torch.no_grad():
            return self.compiled(*self.constants, *self.noise(), *inputs)


def _record(fn: Callable, inputs: tuple, keep: Collection[torch.Tensor], cpu: bool):
    """:func:`record` with the CPU's expansions, its failures as :class:`NotCompiled`."""
    try:
        return record(fn, *inputs, keep=keep, decompositions=CPU_DECOMPOSITIONS if cpu else None)
    except NotCompiled:
        raise
    # whatever make_fx cannot record runs as written (and fails there if it must)
    except Exception as error:
        if _reads_values(error):
            raise NotCompiled(
                "its Python reads the value of a tensor it computed (control flow, .item(), "
                ".tolist(), .numpy() or indexing on a tensor)"
            ) from error
        raise NotCompiled(f"recording it failed: {_first_line(error)}") from error


def _compile(graph, constants: list, noise: Noise, inputs: tuple, options: dict) -> Callable:
    """``graph`` compiled by inductor with ``options`` for inputs shaped, strided and typed as
    :class:`Compiled` calls it, and called once, so that a failure (no C++ compiler, a kernel
    that does not launch) is reported here; torch's generators are left as they were. It is
    ``torch._inductor.compile``, without ``torch.compile``'s Python guards, which cost 0.5 ms of
    the default model's 5 ms step: the compiled code is only called with inputs laid out as these
    (the key of :func:`compile_function`, and the callers' keys by :func:`describe`)."""
    device = inputs[0].device
    try:
        with (
            torch._inductor.config.patch(options),
            torch.no_grad(),  # the graph holds its own gradients: it needs none of autograd
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            _quiet("torch.utils.cpp_extension"),  # "No CUDA runtime is found": says nothing here
        ):
            compiled = torch._inductor.compile(graph, [*constants, *noise(), *inputs])
            Compiled(compiled, constants, noise)(*inputs)
    except Exception as error:
        raise NotCompiled(f"torch.compile failed: {_first_line(error)}") from error
    return compiled


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


def _reads_values(error: BaseException) -> bool:
    """Whether a recording failed because the function's Python needed a computed tensor's value."""
    if isinstance(
        error,
        (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException),
    ):
        return True
    return ".numpy() is not supported for tensor subclasses" in str(
        error
    ) or "data-dependent" in str(error)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
