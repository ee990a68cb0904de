"""Minibatches for :func:`pyro_swag.train.fit`: tensor shuffling, loaders, likelihood scaling."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape

from ._checks import is_int

DEFAULT_BATCH = 128


class _TensorBatches:
    """Shuffled minibatches of a tuple of tensors, drawn from the global torch RNG: an epoch
    is one permutation cut into batches, or (``independent``) as many batches each drawn
    afresh without replacement, independent of each other."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int) -> None:
        self.tensors = tensors
        self.n = tensors[0].shape[0]
        self.batch_size = batch_size
        self.independent = False

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        if self.independent:
            for _ in range(len(self)):
                idx = torch.randperm(self.n)[: self.batch_size]
                yield tuple(t[idx.to(t.device)] for t in self.tensors)
            return
        perm = torch.randperm(self.n)
        for i in range(0, self.n, self.batch_size):
            idx = perm[i : i + self.batch_size]
            yield tuple(t[idx.to(t.device)] for t in self.tensors)


def _is_batch(item) -> bool:
    return isinstance(item, (tuple, list)) and bool(item) and all(
        isinstance(t, torch.Tensor) for t in item)


def _batches(data, batch_size, num_data):
    """Return (iterable of batches, N)."""
    if isinstance(data, dict):
        raise TypeError(
            f"data must be a tuple of tensors (x, y), a list of batches (x, y) or a DataLoader, "
            f"got a dict with keys {list(data)}; pass the tensors as a tuple in the order of "
            "the model's arguments, e.g. data=(x, y)"
        )
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and not (data and all(_is_batch(b) for b in data)):
        if not data or not all(isinstance(t, torch.Tensor) for t in data):
            kinds = ", ".join(type(t).__name__ for t in data) if data else "nothing"
            raise TypeError(
                "data must be a tuple of tensors (x, y), a list of batches (x, y) or a "
                f"DataLoader, got ({kinds}); convert arrays with torch.as_tensor(a, "
                "dtype=torch.float32) (or the dtype of the model's parameters)"
            )
        n = data[0].shape[0] if data[0].dim() else 0
        if n == 0:
            raise ValueError("data holds no rows (the first tensor is empty); pass non-empty data")
        if any(t.dim() == 0 or t.shape[0] != n for t in data):
            raise ValueError(
                f"data tensors have first dimensions {[tuple(t.shape)[:1] for t in data]}; "
                "they must all have the same number of rows"
            )
        if num_data is not None and num_data != n:
            raise ValueError(f"num_data={num_data} but the data tuple has {n} rows; drop num_data")
        bs = min(n, DEFAULT_BATCH) if batch_size is None else batch_size
        if not is_int(bs):
            raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")
        return _TensorBatches(tuple(data), min(int(bs), n)), n
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a tuple of tensors (x, y) or a DataLoader, got {type(data).__name__}"
        )
    if batch_size is not None:
        raise ValueError(
            f"batch_size={batch_size} applies to tensor data only; a loader uses its own "
            "batch size: drop batch_size"
        )
    if num_data is not None and (
        isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1
    ):
        raise ValueError(
            f"num_data must be an integer >= 1 (the full data size), got num_data={num_data!r}; "
            "pass the number of data points the loader draws from"
        )
    if num_data is None:
        dataset = getattr(data, "dataset", None)
        try:
            num_data = len(dataset)
        except TypeError:
            raise ValueError(
                "cannot tell the full data size of this loader (its dataset has no len()); "
                "pass num_data=N so minibatch likelihoods are scaled by N / batch size"
            ) from None
    try:
        empty = len(data) == 0
    except TypeError:  # an iterable-style loader: found out when iterating
        empty = False
    if empty or num_data == 0:
        raise ValueError("the loader is empty (0 batches); pass a loader that yields data")
    return data, int(num_data)


def _as_args(batch) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    hint = ""
    if isinstance(batch, Mapping):
        hint = (f" with keys {list(batch)}: batches are passed as model(*batch, num_data=N), "
                "so yield tuples in the model's argument order, e.g. DataLoader(..., "
                "collate_fn=lambda items: tuple(default_collate(items).values())) with "
                "torch.utils.data.default_collate")
    raise TypeError(
        f"a batch must be a tensor or a tuple/list of tensors, got {type(batch).__name__}{hint}"
    )


def _accepts(model: Callable, name: str | None) -> bool:
    """Whether ``model`` takes the keyword ``name``, looking through poutine handlers."""
    if name is None:
        return False
    fn = model
    while (  # Messenger(...)(fn), e.g. BetaNLL(0.5)(model): a partial(_context_wrap, m, fn)
        isinstance(fn, functools.partial) and len(fn.args) == 2
        and isinstance(fn.args[0], Messenger)
    ):
        fn = fn.args[1]
    fn = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _check_column_targets(trace, tensors) -> None:
    """Name the common cause of Pyro's log_prob shape error: targets of shape (N, 1) that
    broadcast against a plate of size N. Other shape errors are left to the ELBO, which
    applies its own ``max_plate_nesting``."""
    column = [i for i, t in enumerate(tensors)
              if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == 1]
    if not column:
        return
    try:  # the check Pyro's ELBO makes (at its default max_plate_nesting)
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] == "sample" and site["is_observed"]:
                check_site_shape(site, max_plate_nesting=float("inf"))
    except ValueError as err:
        if "log_prob shape" not in str(err):
            raise
        raise ValueError(
            f"{err}\nThe data tensor(s) at position(s) {column} have shape (N, 1): the "
            "trailing axis of size 1 broadcasts against the plate. Pass targets as a "
            "vector, y.squeeze(-1)"
        ) from err


def own_subsample(trace) -> str | None:
    """The name of a plate that the model subsamples itself at random (``subsample_size``
    smaller than its size: a subsample draw in the trace), else None."""
    return next((name for name, site in trace.nodes.items()
                 if site_is_subsample(site) and site["fn"].subsample_size not in
                 (None, site["fn"].size)), None)


def _check_batch(model, args, kwargs, num_data: int, check_scaling: bool):
    """Raise unless the model observes something given a batch, and (``check_scaling``) its
    observed sites are scaled by ``num_data / batch``. Returns the model's trace on the batch.

    A per-point (tensor) scale is compared by its mean: reweightings such as
    :class:`~pyro_swag.models.BetaNLL` normalise their weights to mean 1 over the batch.
    """
    batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None
    with torch.random.fork_rng(), torch.no_grad():
        try:
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        except (RuntimeError, ValueError) as err:
            if batch is None or batch >= num_data:
                raise
            kind = RuntimeError if isinstance(err, RuntimeError) else ValueError
            raise kind(
                f"{err}\nThe model failed on a minibatch of {batch} of num_data={num_data} "
                "rows. fit slices every data tensor along its first axis, so plates of a fixed "
                f"size (e.g. pyro.plate('data', {num_data})) no longer match: take the plate "
                f"size from the data (or subsample it), or pass batch_size={num_data} (full "
                "batch)"
            ) from err
        _check_column_targets(trace, (*args, *kwargs.values()))
    observed = [  # pyro.deterministic sites are observed Deltas, not data
        (name, float(torch.as_tensor(site["scale"], dtype=torch.float64).mean()),
         site["infer"].get("is_auxiliary", False))
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site["is_observed"]
        and not site["infer"].get("_deterministic")
    ]
    if not observed:
        raise ValueError(
            f"the model observes nothing when called with a batch of data ({len(args)} "
            "tensor(s)): its likelihood would become a latent site of the guide. Pass the "
            "targets too, e.g. data=(x, y), in the order of the model's arguments"
        )
    if not check_scaling or batch is None or batch == num_data:
        return trace
    own = own_subsample(trace)
    expected = num_data / batch
    for name, scale, factor in observed:
        if not factor and abs(scale - expected) > 1e-4 * expected:  # a pyro.factor may be a
            # prior term outside the data plate: only sample statements are checked
            raise ValueError(
                f"minibatch of {batch} of num_data={num_data} points, but the observed site "
                f"{name!r} has likelihood scale {scale:g} (mean over the batch) instead of "
                f"{expected:g}: the model does "
                "not declare the full data size. Wrap the likelihood in "
                f"pyro.plate('data', size={num_data}, subsample=torch.arange({batch})) (or accept "
                "a num_data argument), or pass check_scaling=False if the scale is intended"
                + ("" if own is None else
                   f". Here the model subsamples plate {own!r} itself (subsample_size): keep "
                   f"that and let fit pass all the data in every step (batch_size={num_data}), "
                   "or drop subsample_size and let fit make the minibatches")
            )
    return trace
