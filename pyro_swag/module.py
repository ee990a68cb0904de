r"""SWAG for a plain ``torch.nn.Module`` trained by the user's own loop.

:class:`ModuleSWAG` records the network's trainable parameters, flattened in
``named_parameters()`` order into :math:`\theta \in \mathbb{R}^P`, with the same running
moments as :class:`~pyro_swag.SWAGCollector` (:class:`~pyro_swag.SWAGMoments`), and gives
the same Gaussian :math:`q(\theta)` as :class:`~pyro_swag.SWAGGuide`. Buffers (BatchNorm
running statistics) and frozen parameters (``requires_grad=False``) are *not* latents: they
are kept as they are, or, for BatchNorm, re-estimated for every drawn :math:`\theta` by a
pass over a loader (the semantics of :func:`torch.optim.swa_utils.update_bn`), because
statistics collected under other weights do not fit the drawn ones.

:meth:`ModuleSWAG.to_pyro` turns the collected posterior into a Pyro model plus a
:class:`~pyro_swag.SWAGGuide` over the same parameters, so ``pyro.infer.Predictive`` and the
rest of the Pyro workflow apply unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from ._checks import check_positive, is_positive_finite
from .autoguide import SWAGGuide
from .models import observe
from .moments import SWAGMoments

__all__ = ["ModuleSWAG"]

_LIKELIHOODS = ("gaussian", "categorical", "bernoulli")


def _no_model(*args, **kwargs) -> None:
    """Placeholder model of the guide used only for its ``get_posterior``."""


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` contains a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in net.modules())


class ModuleSWAG(nn.Module):
    """SWAG moments of the trainable parameters of ``net``; samples networks from them.

    Parameters
    ----------
    net : nn.Module
        The network being trained (referenced, not copied, not registered as a submodule).
    rank : int
        Number of deviations kept (``K``).
    min_var : float
        Lower clamp of the diagonal variance.
    deviation_dtype : torch.dtype, optional
        Storage dtype of the deviation buffer.
    moments_device : torch.device or str, optional
        Keep the moments elsewhere (e.g. ``"cpu"`` while ``net`` trains on CUDA).

    Examples
    --------
    >>> swag = ModuleSWAG(net, rank=20)
    >>> for epoch in range(epochs):
    ...     train_one_epoch(net)          # the user's loop
    ...     if epoch >= swa_start:
    ...         swag.collect()
    >>> probs = swag.predict(x_test, num_samples=30, loader=train_loader).softmax(-1).mean(0)
    """

    def __init__(
        self,
        net: nn.Module,
        rank: int = 20,
        *,
        min_var: float = 1e-30,
        deviation_dtype: torch.dtype | None = None,
        moments_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self._net = (net,)
        self.layout = [(n, tuple(p.shape)) for n, p in net.named_parameters() if p.requires_grad]
        if not self.layout:
            raise ValueError("net has no trainable parameters (all have requires_grad=False)")
        dtypes = {p.dtype for p in self._params()}
        if len(dtypes) > 1:
            raise TypeError(
                f"net's trainable parameters have several dtypes {sorted(map(str, dtypes))}; "
                "SWAG keeps one flat vector: convert the net to one dtype (e.g. net.float())"
            )
        self.moments = SWAGMoments(rank, min_var, deviation_dtype, moments_device)

    # ---------------------------------------------------------------- layout
    @property
    def net(self) -> nn.Module:
        """The network whose parameters are collected."""
        return self._net[0]

    @property
    def num_snapshots(self) -> int:
        """Number of snapshots collected."""
        return self.moments.count

    def _params(self) -> list[nn.Parameter]:
        named = dict(self.net.named_parameters())
        return [named[name] for name, _ in self.layout]

    def flatten(self) -> torch.Tensor:
        """The current trainable parameters as one flat vector (a detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self._params()])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector (or a batch ``(..., P)``) into ``{name: tensor}`` views."""
        total = sum(math.prod(shape) for _, shape in self.layout)
        if theta.dim() == 0 or theta.shape[-1] != total:
            raise ValueError(
                f"theta has shape {tuple(theta.shape)}, expected (..., {total}): the network "
                f"has {total} trainable parameters"
            )
        out, i = {}, 0
        for name, shape in self.layout:
            size = math.prod(shape)
            out[name] = theta[..., i : i + size].reshape(*theta.shape[:-1], *shape)
            i += size
        return out

    @torch.no_grad()
    def collect(self) -> None:
        """Record the network's current trainable parameters."""
        self.moments.update(self.flatten())

    # -------------------------------------------------------------- posterior
    def _device(self) -> torch.device:
        return self._params()[0].device

    def guide_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SWA mean, diagonal variance and deviation rows, on the network's device."""
        if self.num_snapshots < 2:
            raise RuntimeError(
                f"{self.num_snapshots} snapshot(s) collected, need at least 2; call collect() "
                "once per epoch (or every few steps) of the SWA phase"
            )
        dev = self._device()
        m = self.moments
        return m.mean.to(dev), m.variance().to(dev), m.deviation_matrix().to(dev)

    def posterior(self, scale: float = 1.0, diagonal: bool = False) -> dist.TorchDistribution:
        """The SWAG Gaussian over ``theta``, exactly that of :class:`~pyro_swag.SWAGGuide`."""
        loc, var, dev = self.guide_tensors()
        return SWAGGuide(_no_model, loc, var, dev, scale=scale, diagonal=diagonal).get_posterior()

    def functional(
        self, theta: torch.Tensor, *args: Any, buffers: dict | None = None, **kwargs: Any
    ) -> Any:
        """``net(*args)`` evaluated at parameters ``theta`` via ``torch.func.functional_call``."""
        values = {**self.unflatten(theta), **(buffers or {})}
        return functional_call(self.net, values, args, kwargs)

    def _network(self, theta: torch.Tensor, loader, bn_update: bool | None) -> nn.Module:
        work = copy.deepcopy(self.net)
        self._refresh(work, theta, loader, bn_update)
        return work

    def _refresh(self, work: nn.Module, theta, loader, bn_update) -> None:
        named = dict(work.named_parameters())
        with torch.no_grad():  # copy, not vector_to_parameters: its views would alias theta
            for name, value in self.unflatten(theta.to(self._device())).items():
                named[name].copy_(value)
        if bn_update is None:
            bn_update = has_batchnorm(work)
        if bn_update:
            if loader is None:
                raise ValueError(
                    "the network has BatchNorm layers, whose statistics must be re-estimated "
                    "for each drawn network: pass loader=<training DataLoader> (or "
                    "bn_update=False to keep the statistics of the last trained network)"
                )
            update_bn(loader, work, device=self._device())
        work.eval()

    def sample_network(
        self,
        loader: Iterable | None = None,
        *,
        scale: float = 1.0,
        diagonal: bool = False,
        bn_update: bool | None = None,
    ) -> nn.Module:
        """A copy of ``net`` with parameters drawn from SWAG, BatchNorm refreshed, in eval mode."""
        theta = self.posterior(scale, diagonal).sample()
        return self._network(theta, loader, bn_update)

    def swa_network(self, loader: Iterable | None = None, bn_update: bool | None = None):
        """A copy of ``net`` at the SWA mean, BatchNorm refreshed over ``loader``, in eval mode."""
        return self._network(self.guide_tensors()[0], loader, bn_update)

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        num_samples: int = 30,
        *,
        loader: Iterable | None = None,
        scale: float = 1.0,
        diagonal: bool = False,
        bn_update: bool | None = None,
    ) -> torch.Tensor:
        """Outputs of ``num_samples`` SWAG networks on ``x``, stacked to ``(S, *out)``.

        ``bn_update`` (default: on when the net has BatchNorm) re-estimates BatchNorm
        statistics for every draw with one pass over ``loader`` (batches ``x`` or ``(x, ...)``).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        thetas = self.posterior(scale, diagonal).sample((num_samples,))
        work = copy.deepcopy(self.net)
        outs = []
        for theta in thetas:
            self._refresh(work, theta, loader, bn_update)
            outs.append(work(x))
        return torch.stack(outs)

    # ------------------------------------------------------------ persistence
    def get_extra_state(self) -> dict[str, Any]:
        return {"layout": [(n, list(s)) for n, s in self.layout]}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Restore the moments exactly; raises before anything changes on a mismatch."""
        if "_extra_state" in state_dict:
            self.set_extra_state(state_dict["_extra_state"])  # the layout check
        buffers = ("moments.mean", "moments.m2", "moments.deviations")
        if strict:  # torch would raise only after loading the keys that are there
            want = {"_extra_state", "moments._extra_state"}
            want |= set(buffers) if "moments.mean" in state_dict else set()
            if set(state_dict) != want:
                raise RuntimeError(
                    f"the checkpoint lacks {sorted(want - set(state_dict))} and has unexpected "
                    f"{sorted(set(state_dict) - want)}; pass a ModuleSWAG.state_dict() "
                    "(or strict=False)"
                )
        size = sum(math.prod(shape) for _, shape in self.layout)
        for key in buffers:
            value = state_dict.get(key)
            if value is not None and value.shape[-1] != size:
                raise ValueError(
                    f"the checkpoint's {key} has {value.shape[-1]} entries per snapshot but this "
                    f"network has {size} parameters; load it into ModuleSWAG of the same "
                    "architecture"
                )
        self.moments.check_state(state_dict, "moments.", dtype=self._params()[0].dtype)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        found = [(n, tuple(s)) for n, s in state["layout"]]
        if found != self.layout:
            raise ValueError(
                f"the checkpoint was collected from a network with parameters {found}, this one "
                f"has {self.layout}; load it into ModuleSWAG of the same architecture"
            )

    # ------------------------------------------------------------------ Pyro
    def to_pyro(
        self,
        prior_scale: float = 1.0,
        likelihood: str = "gaussian",
        *,
        noise: float | None = None,
        noise_prior: tuple[float, float] = (1.0, 0.01),
        data: Iterable | None = None,
        scale: float = 1.0,
        diagonal: bool = False,
        bn_per_draw: bool = False,
    ) -> tuple[Callable, SWAGGuide]:
        r"""A Pyro model over the network's parameters and the SWAG guide for it.

        The model, called as ``model(x, y=None, num_data=None)``, samples every trainable
        parameter as a latent site of the same name with prior
        :math:`\mathcal{N}(0, \sigma_p^2)` (``prior_scale``), runs the network in eval mode
        through ``functional_call`` and observes ``"obs"`` in ``pyro.plate("data",
        num_data)``: ``Normal(out, sigma)``, ``Categorical(logits=out)`` or
        ``Bernoulli(logits=out)``. BatchNorm runs in eval mode with fixed statistics: those
        of the SWA mean, re-estimated over ``data`` (a loader) when given, else the net's
        current ones; ``bn_per_draw=True`` instead re-estimates them over ``data`` on every
        model call, i.e. for every draw (sequential draws only: ``Predictive(parallel=False)``).

        With ``likelihood="gaussian"`` and ``noise=None`` the precision
        :math:`\tau \sim \mathrm{Gamma}(a, b)` (``noise_prior``) is a latent site
        ``"precision"``; its guide entry is the conditional posterior given the SWA-mean
        residuals over ``data`` (``N`` points, squared error sum ``S``),
        :math:`\tau \mid \bar\theta \sim \mathrm{Gamma}(a + N/2, b + S/2)`, matched in
        :math:`\log\tau` (mean :math:`\psi(a') - \log b'`, variance :math:`\psi_1(a')`) and
        independent of the weights.
        """
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r} is not one of {_LIKELIHOODS}")
        check_positive("prior_scale", prior_scale, "the prior sd of every weight, e.g. 1.0")
        check_positive("noise", noise, "a fixed noise sd, or None to learn the precision",
                       optional=True)
        if not (isinstance(noise_prior, (tuple, list)) and len(noise_prior) == 2
                and all(map(is_positive_finite, noise_prior))):
            raise ValueError(
                f"noise_prior must be (concentration, rate), two positive finite numbers, got "
                f"noise_prior={noise_prior!r}"
            )
        learned = likelihood == "gaussian" and noise is None
        if learned and data is None:
            raise ValueError(
                "likelihood='gaussian' with noise=None learns the noise precision from the "
                "SWA-mean residuals: pass data=<loader of (x, y)>, or a fixed noise=sd"
            )
        bn_loader = data if has_batchnorm(self.net) else None
        if bn_per_draw and bn_loader is None:
            raise ValueError(
                "bn_per_draw=True re-estimates BatchNorm statistics over data for every draw: "
                "it needs a net with BatchNorm layers and data=<loader>"
            )
        loc, var, dev = self.guide_tensors()
        net = self._network(loc, bn_loader, None if bn_loader is not None else False)
        for p in net.parameters():
            p.requires_grad_(False)
        buffers = dict(net.named_buffers())
        layout = list(self.layout)
        if learned:
            a, b = _noise_posterior(net, data, noise_prior, self._device())
            loc = torch.cat([loc, (torch.digamma(a) - b.log()).to(loc).reshape(1)])
            # SWAG's diagonal is (scale/2) * variance (SWAG-Diag: scale * variance): store 2x
            # (1x) so that scale=1 gives the conditional posterior's variance
            factor = 1 if diagonal else 2
            var = torch.cat([var, factor * torch.polygamma(1, a).to(var).reshape(1)])
            dev = torch.cat([dev, dev.new_zeros(dev.shape[0], 1)], dim=1)
            layout.append(("precision", ()))
        model = _NetModel(net, self.layout, buffers, prior_scale, likelihood, noise, noise_prior)
        model.bn_loader = bn_loader if bn_per_draw else None
        guide = SWAGGuide(model, loc, var, dev, scale=scale, diagonal=diagonal, layout=layout)
        return model, guide


@torch.no_grad()
def _noise_posterior(net, data, prior, device) -> tuple[torch.Tensor, torch.Tensor]:
    n, sse = 0, torch.zeros((), dtype=torch.float64)
    for batch in data:
        x, y = batch[0].to(device), batch[1].to(device)
        sse += (net(x).reshape(y.shape) - y).pow(2).sum().double().cpu()
        n += y.shape[0]
    a = torch.tensor(prior[0] + n / 2, dtype=torch.float64)
    return a, prior[1] + sse / 2


class _NetModel:
    """Pyro model: the network's trainable parameters as latent sites, then a likelihood."""

    def __init__(self, net, layout, buffers, prior_scale, likelihood, noise, noise_prior):
        self.net, self.layout, self.buffers = net, layout, buffers
        self.prior_scale, self.likelihood = float(prior_scale), likelihood
        self.noise, self.noise_prior = noise, noise_prior
        self.bn_loader = None

    @torch.no_grad()
    def _refreshed_buffers(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """BatchNorm statistics of the drawn parameters, one ``update_bn`` pass over the data."""
        named = dict(self.net.named_parameters())
        for name, shape in self.layout:
            if params[name].shape != shape:
                raise ValueError(
                    f"bn_per_draw needs one draw per model call, but site {name!r} has shape "
                    f"{tuple(params[name].shape)} (expected {shape}); use Predictive(..., "
                    "parallel=False)"
                )
            named[name].copy_(params[name])
        device = next(iter(named.values())).device
        update_bn(self.bn_loader, self.net, device=device)
        return {k: v.clone() for k, v in self.net.named_buffers()}

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None):
        params = {}
        for name, shape in self.layout:
            prior = dist.Normal(x.new_zeros(()), self.prior_scale).expand(shape)
            params[name] = pyro.sample(name, prior.to_event(len(shape)))
        buffers = self.buffers if self.bn_loader is None else self._refreshed_buffers(params)
        out = functional_call(self.net, {**params, **buffers}, (x,))
        observe(out, y, self.likelihood, self.noise, self.noise_prior, num_data)
        return out
