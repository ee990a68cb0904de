"""Layout bookkeeping shared by the fitted guides: the base class that knows its latent sites.

A guide fitted elsewhere (SWAG, a MultiSWAG mixture) is set up on the model only when it first
runs; these helpers check that the model's latent sites are the ones it was fitted on.
"""

from __future__ import annotations

import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.guides import prototype_hide_fn

__all__ = ["FittedContinuous", "KeepsModelWhenPickled", "model_of"]


class KeepsModelWhenPickled:
    """Pickling (``torch.save(guide)``) leaves the live guide attached to its model.

    Pyro's ``AutoGuide.__getstate__`` drops the model (and the parent guide) from the pickled
    state by setting them to ``None`` on the guide itself, so the guide that was saved can no
    longer find its model. The pickled state still holds no model; the live guide keeps it.
    """

    def __getstate__(self):
        model, master = self._model, self.master
        state = dict(super().__getstate__())
        self._model, self.master = model, master
        return state


def model_of(guide) -> object | None:
    """The model an autoguide was built on, or None (a guide loaded from a pickle has none:
    Pyro does not pickle the model)."""
    try:
        return getattr(guide, "model", None)
    except TypeError:  # AutoGuide.model of an unpickled guide: self._model is None
        return None


def _layout(guide: AutoContinuous) -> list[tuple[str, tuple[int, ...]]]:
    """Site names and unconstrained shapes, in the order they are packed."""
    return [(name, tuple(shape)) for name, shape in guide._unconstrained_shapes.items()]


def _adopt_prototype(guide: FittedContinuous, source: AutoContinuous) -> FittedContinuous:
    """Give ``guide`` the set-up prototype of ``source`` (a collector or a fitted guide)."""
    for attr in ("prototype_trace", "_unconstrained_shapes", "_cond_indep_stacks", "latent_dim"):
        setattr(guide, attr, getattr(source, attr))
    guide._prototype_frames = dict(source._prototype_frames)
    return guide


def _check_layout(expected: list, found: list, what: str) -> None:
    expected = [(n, tuple(s)) for n, s in expected]
    if expected != found:
        raise ValueError(
            f"the model's latent structure changed: {what} has sites {expected} but the model "
            f"now has {found}; use the model {what} was built from"
        )


class FittedContinuous(KeepsModelWhenPickled, AutoContinuous):
    """Base of guides fitted elsewhere whose latent layout is known (``self.layout``).

    Sites outside the layout are not the guide's: the model's observed sites called with
    ``obs=None`` (as in ``Predictive(model, guide)(x)``) and sites that only exist when
    predicting are left to the model, as Pyro does for any autoguide once it is set up. A
    model whose layout sites changed (renamed, reshaped, missing) is refused. Setting up never
    shifts the random stream.
    """

    layout: list | None = None

    def _prototype_hide_fn(self, msg: dict) -> bool:
        names = {name for name, _ in self.layout or ()}
        return prototype_hide_fn(msg) or bool(names and msg["name"] not in names)

    def _set_up_for(self, what: str, args: tuple, kwargs: dict) -> None:
        if self.prototype_trace is not None:
            return
        try:
            self._setup_prototype(*args, **kwargs)
        except TypeError as err:
            if args or kwargs:
                raise
            raise RuntimeError(
                f"{type(self).__name__}.{what} of a guide that has not run yet needs the "
                f"model's arguments to find its latent sites: pass them, e.g. "
                f"guide.{what[:-2]}(..., x)"
            ) from err

    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior median of each latent site (constrained); sets the guide up if needed."""
        self._set_up_for("median()", args, kwargs)
        return super().median(*args, **kwargs)

    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Marginal quantiles of each latent site (constrained); sets the guide up if needed."""
        self._set_up_for("quantiles()", args, kwargs)
        return super().quantiles(quantiles, *args, **kwargs)

    def _setup_prototype(self, *args, **kwargs) -> None:
        with torch.random.fork_rng():
            super()._setup_prototype(*args, **kwargs)
        if self.layout is not None:
            _check_layout(self.layout, _layout(self), "the fitted guide")
        if self.latent_dim != self.loc.shape[-1]:
            hint = "" if self.layout else (
                " (the guide has no layout, so sites outside it cannot be told apart: pass "
                "layout=[(site name, unconstrained shape), ...])"
            )
            raise ValueError(
                f"the model has {self.latent_dim} unconstrained latent entries but the guide "
                f"was fitted on {self.loc.shape[-1]}; use the model it was fitted on{hint}"
            )
        self._follow_model()

    def _follow_model(self) -> None:
        """Give the guide's tensors the device and dtype of the model's latent values (a guide
        saved from a float32 or CUDA model and loaded for a float64 or CPU one). Buffers kept
        in a lower precision on purpose (SWAG's deviations) keep their dtype."""
        values = [site["value"] for _, site in self.prototype_trace.iter_stochastic_nodes()]
        ref = next((v for v in values if torch.is_tensor(v) and v.is_floating_point()), None)
        old = self.loc.dtype
        if ref is None or (ref.dtype, ref.device) == (old, self.loc.device):
            return
        for name, buf in list(self.named_buffers(recurse=False)):
            dtype = ref.dtype if buf.dtype == old else buf.dtype
            setattr(self, name, buf.to(ref.device, dtype))
