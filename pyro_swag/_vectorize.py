"""Machinery of :mod:`pyro_swag.predictive`: a Pyro model vmapped over posterior draws.

``_run_vmapped`` traces ``poutine.condition(model, draw)`` under :func:`torch.func.vmap`;
sites to predict are not sampled inside it (:class:`_DeferSampling` records their
distributions), and ``_flatten``/``_rebuild`` turn a recorded, batched distribution into the
distribution of one draw, so that it is sampled exactly as sequential Pyro would.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta, Independent, Normal
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import Distribution
from torch.distributions.transforms import Transform, _InverseTransform
from torch.distributions.utils import _standard_normal

from ._checks import is_int


# ------------------------------------------------------------- distribution flattening
def _flatten(obj: Any, out: list) -> tuple:
    """Describe ``obj`` (a distribution, possibly nested) with its tensors moved to ``out``."""
    if torch.is_tensor(obj):
        out.append(obj)
        return ("t", len(out) - 1)
    if isinstance(obj, (Distribution, Transform)):
        # a Transform's _inv caches its inverse (dropped); an inverse's _inv is its forward
        keep = isinstance(obj, _InverseTransform)
        state = {k: _flatten(v, out) for k, v in vars(obj).items() if keep or k != "_inv"}
        return ("o", type(obj), state)
    if type(obj) in (list, tuple):
        return ("l", type(obj), [_flatten(v, out) for v in obj])
    if type(obj) is dict:
        return ("d", {k: _flatten(v, out) for k, v in obj.items()})
    return ("v", obj)


def _rebuild(spec: tuple, tensors: Sequence[torch.Tensor], i: int) -> Any:
    """The object described by ``spec`` for draw ``i`` of the stacked ``tensors``."""
    kind = spec[0]
    if kind == "t":
        return tensors[spec[1]][i]
    if kind == "o":
        obj = object.__new__(spec[1])
        obj.__dict__.update({k: _rebuild(v, tensors, i) for k, v in spec[2].items()})
        if isinstance(obj, Transform) and not isinstance(obj, _InverseTransform):
            obj._inv = None
        return obj
    if kind == "l":
        return spec[1](_rebuild(v, tensors, i) for v in spec[2])
    if kind == "d":
        return {k: _rebuild(v, tensors, i) for k, v in spec[1].items()}
    return spec[1]


def _normal_plan(spec: tuple, flat: Sequence[torch.Tensor]) -> tuple | None:
    """``(loc index, scale index, noise)`` if ``spec`` is a ``Normal`` (optionally inside
    ``Independent``) called with no arguments, else ``None``.

    Pyro samples such a site with ``Normal.rsample``: ``loc + eps * scale`` with
    ``eps = _standard_normal(batch_shape, dtype, device)``. ``noise()`` is that same call, so
    the draws' ``eps`` can be generated one by one, in Pyro's order (the same random stream),
    and ``loc + eps * scale`` computed once for all draws: bit for bit what the per-draw calls
    give.
    """
    _, _, (fn, fn_args, fn_kwargs) = spec
    if fn_args[2] or fn_kwargs[0] != "d" or set(fn_kwargs[1]) - {"sample_shape"}:
        return None
    shape_spec = fn_kwargs[1].get("sample_shape", ("v", ()))
    if shape_spec[0] != "v" or len(shape_spec[1]) != 0:
        return None
    while fn[0] == "o" and fn[1] is Independent:
        fn = fn[2]["base_dist"]
    if fn[0] != "o" or fn[1] is not Normal:
        return None
    loc, scale = fn[2].get("loc"), fn[2].get("scale")
    if loc is None or scale is None or loc[0] != "t" or scale[0] != "t":
        return None
    batch = tuple(fn[2]["_batch_shape"][1])
    ref = flat[loc[1]]
    if tuple(ref.shape[1:]) != batch or tuple(flat[scale[1]].shape[1:]) != batch:
        return None
    return loc[1], scale[1], partial(_standard_normal, batch, dtype=ref.dtype, device=ref.device)


def _sample_deferred(deferred: list, flat: Sequence[torch.Tensor], count: int) -> dict:
    """Sample the recorded sites for draws ``0..count-1``, in sequential Pyro's order.

    Draw by draw, site by site: a Normal site draws its standard-normal noise through a
    template (:func:`_normal_plan`), any other site is rebuilt for that draw and called as Pyro
    calls it. Returns ``{site: (count, *value_shape)}``.
    """
    plans = [(name, s, _normal_plan(s, flat)) for name, s in deferred]
    rows: dict[str, list] = {name: [] for name, _, _ in plans}
    with torch.no_grad():
        for i in range(count):
            for name, s, plan in plans:
                if plan is None:
                    fn, fn_args, fn_kwargs = _rebuild(s, flat, i)
                    rows[name].append(fn(*fn_args, **fn_kwargs))
                else:
                    rows[name].append(plan[2]())
        out = {}
        for name, _, plan in plans:
            value = torch.stack(rows[name])
            out[name] = value if plan is None else flat[plan[0]] + value * flat[plan[1]]
    return out


class _DeferSampling(Messenger):
    """Record, instead of sampling, sites that are neither conditioned nor observed."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[dict] = []

    def _pyro_sample(self, msg: dict) -> None:
        if msg["value"] is not None or msg["is_observed"] or msg["done"]:
            return
        if not isinstance(msg["fn"], Distribution):  # e.g. a plate's subsample site
            return
        if _is_delta(msg["fn"]):  # no randomness (e.g. an unconditioned deterministic)
            return
        fn = msg["fn"]
        self.sites.append(msg)
        shape = tuple(msg["kwargs"].get("sample_shape", ())) + tuple(fn.batch_shape)
        tensors: list[torch.Tensor] = []
        _flatten(fn, tensors)  # its tensors, wrappers (Independent, masks) included
        ref = tensors[0] if tensors else None
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
        msg["value"] = torch.full(
            shape + tuple(fn.event_shape),
            float("nan"),
            dtype=dtype or torch.get_default_dtype(),
            device=ref.device if ref is not None else None,
        )


def _is_delta(fn: Distribution) -> bool:
    """Whether ``fn`` is a (wrapped: Independent, masked, expanded) ``Delta``."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, Delta)


# ----------------------------------------------------------------------- helpers
def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _check_positive_int(value: Any, name: str) -> int:
    if not is_int(value):
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return int(value)


def _num_draws(samples: dict[str, torch.Tensor], name: str) -> int:
    if not isinstance(samples, dict):
        hint = "" if not callable(samples) else (
            ": pass a guide as guide=..." if name == "posterior_samples" else
            f": draw them first, e.g. {name}=predictive(model, guide, x, num_samples=100)")
        raise TypeError(
            f"{name} must be a dict of draws {{site: tensor (S, ...)}}, got a "
            f"{type(samples).__name__}{hint}"
        )
    if not samples:
        raise ValueError(f"{name} must be a non-empty dict {{site: tensor (S, ...)}}, got {{}}")
    sizes = {k: v.shape[0] if torch.is_tensor(v) and v.dim() else None for k, v in samples.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            f"{name} must hold tensors with one common leading draw dimension S, got "
            f"leading sizes {sizes}"
        )
    return next(iter(sizes.values()))


def _chunks(num: int, chunk_size: int | None) -> list[slice]:
    if chunk_size is None:
        return [slice(0, num)]
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    return [slice(a, min(a + chunk_size, num)) for a in range(0, num, chunk_size)]


def _run_vmapped(model: Callable, values: dict, args: tuple, kwargs: dict, body: Callable):
    """``vmap`` of ``body(trace, deferred_sites, return_value)`` over a dict of draws."""
    names = list(values)

    def one(*vals):
        defer = _DeferSampling()
        with poutine.trace() as tracer, defer:
            ret = poutine.condition(model, dict(zip(names, vals)))(*args, **kwargs)
        return body(tracer.trace, defer.sites, ret)

    with torch.no_grad(), pyro.validation_enabled(False):
        return torch.func.vmap(one, randomness="error")(*[values[k] for k in names])


def _followed(trace, names: set) -> bool:
    """Whether any sample site comes after the first of ``names`` in ``trace`` (and so might
    use its value)."""
    seen = False
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or site_is_subsample(node):
            continue
        if seen:
            return True
        seen = name in names
    return False


def _check_not_fed_forward(model, values, sampled, deferred, fixed_names, first, args, kwargs):
    """Raise when a predicted site's value changes what follows it: the model is run again
    with the predicted values conditioned, and its distributions and fixed sites must be
    those of the pass with placeholders (NaN alone misses ``z > 0.5`` or ``z.bool()``)."""

    def body(trace, _deferred, ret):
        flat: list[torch.Tensor] = []
        for name in deferred:
            m = trace.nodes[name]
            _flatten((m["fn"], m["args"], m["kwargs"]), flat)
        fixed = [ret if s == "_RETURN" else trace.nodes[s]["value"] for s in fixed_names]
        return tuple(fixed) + tuple(flat)

    again = _run_vmapped(model, {**values, **sampled}, args, kwargs, body)

    def same(a, b):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.allclose(a, b) if a.is_floating_point() else torch.equal(a, b)

    if len(again) != len(first) or not all(map(same, first, again)):
        raise RuntimeError(
            "the model uses a predicted site's value (sites after it change with it)"
        )


def _prototype(model: Callable, args: tuple, kwargs: dict):
    """Trace the model once with prior draws, consuming the RNG as ``Predictive`` does."""
    init_model = InitMessenger(init_to_sample)(model)
    with torch.no_grad():
        # Predictive runs the model twice before drawing (plate nesting guess + shape
        # trace); doing the same keeps seeded draws identical to it.
        with poutine.block():
            poutine.trace(init_model).get_trace(*args, **kwargs)
        return prune_subsample_sites(poutine.trace(init_model).get_trace(*args, **kwargs))


def _map_draws(model, values, args, kwargs, body, chunk_size, what) -> list[torch.Tensor]:
    """Stack ``body``'s tensors over all draws: vmap per chunk, or a loop as fallback."""
    num = _num_draws(values, "samples")
    try:
        out: dict[int, torch.Tensor] = {}
        for c in _chunks(num, chunk_size):
            part = _run_vmapped(model, {k: v[c] for k, v in values.items()}, args, kwargs, body)
            for j, value in enumerate(part):
                _put(out, j, num, c, value)
        return [out[j] for j in range(len(out))]
    except (RuntimeError, NotImplementedError, TypeError, IndexError) as err:
        _warn_fallback(what, err)
    rows = []
    with torch.no_grad():
        for i in range(num):
            defer = _DeferSampling()
            with poutine.trace() as tracer, defer:
                ret = poutine.condition(model, {k: v[i] for k, v in values.items()})(
                    *args, **kwargs
                )
            rows.append(body(tracer.trace, defer.sites, ret))
    return [torch.stack(r) for r in zip(*rows)]


def _warn_fallback(what: str, err: BaseException) -> None:
    warnings.warn(
        f"{what}: the model could not be vectorized over draws ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}); using the sequential path",
        RuntimeWarning,
        stacklevel=3,
    )


def _put(out: dict, name: Any, num: int, rows: slice, value: torch.Tensor) -> None:
    """Write draws ``rows`` of a site into one preallocated (S, ...) tensor (no fragments)."""
    if name not in out:
        out[name] = value.new_empty((num,) + tuple(value.shape[1:]))
    out[name][rows] = value
