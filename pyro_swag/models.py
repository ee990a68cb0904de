r"""Bayesian neural networks as Pyro models, ready for SWAG, SVI and NUTS.

:class:`BayesianMLP` is a ``PyroModule`` MLP whose ``nn.Linear`` weights and biases carry
``PyroSample`` priors :math:`\mathcal{N}(0, \sigma_p^2)`, with a Gaussian (learned or fixed
noise), categorical or Bernoulli likelihood. The data plate declares the full data size,
so minibatches scale the likelihood by :math:`N / B`::

    with pyro.plate("data", size=num_data, subsample=torch.arange(B)):
        pyro.sample("obs", likelihood, obs=y)
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroModule, PyroSample
from pyro.poutine.messenger import Messenger
from torch import nn

from ._checks import is_int, is_positive_finite

__all__ = ["BayesianMLP", "BetaNLL", "HETEROSCEDASTIC", "LIKELIHOODS", "MIN_SD", "observe"]

LIKELIHOODS = ("gaussian", "categorical", "bernoulli")
HETEROSCEDASTIC = "heteroscedastic"
MIN_SD = 1e-3  # floor of a heteroscedastic network's noise sd (in the units of y)


_ACTIVATIONS = ("tanh", "relu")


def _inplace(t: torch.Tensor) -> bool:
    """Whether ``t`` may be overwritten: no autograd graph needs it."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def observe(
    out: torch.Tensor,
    y: torch.Tensor | None,
    likelihood: str = "gaussian",
    noise: float | str | None = None,
    noise_prior: tuple[float, float] = (1.0, 0.01),
    num_data: int | None = None,
) -> None:
    """The likelihood of network outputs ``out`` (B, out_features): site ``"obs"``.

    Gaussian with fixed ``noise`` sd, a learned precision ``"precision" ~
    Gamma(*noise_prior)``, or (``noise="heteroscedastic"``) a per-point sd read off the
    network: ``out`` is then (B, 2), mean ``out[:, 0]`` and sd
    ``softplus(out[:, 1]) + MIN_SD``. Bernoulli or categorical on logits. In the plate
    ``"data"`` of full size ``num_data`` (default B), so a minibatch is scaled by
    ``num_data / B``.
    """
    if likelihood == "gaussian" and noise == HETEROSCEDASTIC:
        if out.shape[-1] != 2:
            raise ValueError(f"noise='heteroscedastic' needs 2 network outputs (mean, sd), got "
                             f"out.shape={tuple(out.shape)}")
        obs = dist.Normal(out[..., 0], torch.nn.functional.softplus(out[..., 1]) + MIN_SD)
    elif likelihood == "gaussian":
        if noise is None:
            c, r = noise_prior
            tau = pyro.sample("precision", dist.Gamma(out.new_tensor(c), out.new_tensor(r)))
            sigma = tau.rsqrt()
        else:
            sigma = out.new_tensor(noise)
        obs = dist.Normal(out.squeeze(-1), sigma)
    elif likelihood == "bernoulli":
        obs = dist.Bernoulli(logits=out.squeeze(-1))
    else:
        obs = dist.Categorical(logits=out)
    index = torch.arange(out.shape[0], device=out.device)
    with pyro.plate("data", size=num_data or out.shape[0], subsample=index):
        pyro.sample("obs", obs, obs=y)


class BetaNLL(Messenger):
    r"""Weight each point's log-likelihood at site ``"obs"`` by its detached variance to
    the power ``beta`` (beta-NLL, Seitzer et al. 2022), normalised to mean 1 over the batch
    (sg: stop-gradient):

    .. math:: w_i = \frac{\operatorname{sg}(\sigma_i^{2\beta})}
                         {\frac1B \sum_j \operatorname{sg}(\sigma_j^{2\beta})}.

    For a heteroscedastic network the gradient on the mean becomes
    :math:`w_i (\mu_i - y_i) / \sigma_i^2`, so points given a large sd are no longer
    ignored (at ``beta=1`` it is the squared error's gradient up to the weights'
    normalisation), while the fixed point of :math:`\sigma_i^2` stays
    :math:`(\mu_i - y_i)^2`. It changes the loss, not the model: use it while fitting, not
    when scoring. The normalisation keeps the likelihood's total weight against the prior.
    The site must have a Gaussian (``Normal``) likelihood of finite variance; any other
    distribution is refused with a ``ValueError``.
    """

    def __init__(self, beta: float = 0.5, site: str = "obs") -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
            raise ValueError(f"beta must be a number in [0, 1], got beta={beta!r} "
                             f"(0.5 is the usual choice)")
        super().__init__()
        self.beta, self.site = float(beta), site

    def _process_message(self, msg) -> None:
        if msg["name"] != self.site or self.beta == 0:
            return
        fn = msg["fn"]
        variance = fn.variance.detach() if isinstance(fn, torch.distributions.Normal) else None
        if variance is None or not bool(torch.isfinite(variance).all()):
            what = "non-finite variance" if variance is not None else type(fn).__name__
            raise ValueError(
                f"BetaNLL: site {self.site!r} has a {what} likelihood; beta-NLL applies to "
                f"Gaussian likelihoods (Normal with finite variance) only: drop BetaNLL or "
                f"point site= at a Gaussian site"
            )
        weight = variance**self.beta
        msg["scale"] = msg["scale"] * weight / weight.mean()


class _LayerPrior:
    """``Normal(0, layer.prior_scale)`` over a layer's weight or bias (picklable)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, layer: nn.Linear) -> dist.Distribution:
        shape = (
            (layer.out_features, layer.in_features)
            if self.name == "weight"
            else (layer.out_features,)
        )
        scale = layer.prior_scale
        return (
            dist.Normal(torch.zeros((), dtype=scale.dtype, device=scale.device), scale)
            .expand(shape)
            .to_event(len(shape))
        )


class BayesianMLP(PyroModule):
    r"""A fully connected Bayesian network ``in -> hidden... -> out``.

    Parameters
    ----------
    in_features, out_features : int
        Input size; output size (1 for regression and Bernoulli, #classes for categorical).
    hidden : tuple of int
        Hidden layer widths, e.g. ``(50,)`` or ``(50, 50)``; ``()`` is a Bayesian linear model.
    likelihood : {"gaussian", "categorical", "bernoulli"}
        Observation model of the site ``"obs"``.
    prior_scale : float
        Standard deviation of the Normal prior on every weight and bias.
    noise : float, None or "heteroscedastic"
        Gaussian likelihood only: a fixed noise sd, ``None`` to learn the precision
        ``tau ~ Gamma(noise_prior)`` (site ``"precision"``), or ``"heteroscedastic"``: the
        last layer has two outputs, mean and :math:`\sigma(x) = \mathrm{softplus}(\cdot) +
        10^{-3}`, so the noise varies with the input and has no latent site of its own.
    noise_prior : tuple of float
        Concentration and rate of the Gamma prior on the noise precision.
    activation : {"tanh", "relu"}
        Hidden-layer non-linearity.

    Notes
    -----
    Call as ``model(x, y=None, num_data=None)``; ``num_data`` is the full data size when
    ``x`` is a minibatch. The result is the network output (mean or logits; with
    ``noise="heteroscedastic"`` the two columns mean and raw sd).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        hidden: tuple[int, ...] = (50,),
        likelihood: str = "gaussian",
        prior_scale: float = 1.0,
        noise: float | str | None = None,
        noise_prior: tuple[float, float] = (1.0, 0.01),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r} is not one of {LIKELIHOODS}")
        if not is_int(in_features):
            raise ValueError(f"in_features must be an int >= 1, got in_features={in_features!r}")
        if not (isinstance(hidden, (tuple, list)) and all(map(is_int, hidden))):
            raise ValueError(
                f"hidden must be a tuple of layer widths, ints >= 1, got hidden={hidden!r}; "
                "e.g. hidden=(50,), or () for a Bayesian linear model"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {_ACTIVATIONS}")
        if likelihood == "bernoulli" and out_features != 1:
            raise ValueError(f"bernoulli needs out_features=1, got out_features={out_features}")
        if likelihood == "categorical" and out_features < 2:
            raise ValueError(
                f"categorical needs out_features >= 2 (one logit per class), got "
                f"out_features={out_features}"
            )
        if not is_positive_finite(prior_scale):
            raise ValueError(f"prior_scale must be > 0 and finite, got prior_scale={prior_scale!r}")
        if isinstance(noise, str) and noise != HETEROSCEDASTIC:
            raise ValueError(f"noise={noise!r} is not a number, None or {HETEROSCEDASTIC!r}")
        if noise is not None and not isinstance(noise, str):
            if likelihood != "gaussian":
                raise ValueError(
                    f"a fixed noise applies to likelihood='gaussian' only, got noise={noise!r} "
                    f"with likelihood={likelihood!r}; drop noise"
                )
            if not is_positive_finite(noise):
                raise ValueError(
                    f"noise must be a positive finite sd, None (learn it) or "
                    f"{HETEROSCEDASTIC!r}, got noise={noise!r}"
                )
        if len(tuple(noise_prior)) != 2 or not all(is_positive_finite(v) for v in noise_prior):
            raise ValueError(
                f"noise_prior must be (concentration, rate), both > 0 and finite, got "
                f"noise_prior={noise_prior!r}"
            )
        if noise == HETEROSCEDASTIC and (likelihood != "gaussian" or out_features != 1):
            raise ValueError(
                f"noise='heteroscedastic' needs likelihood='gaussian' and out_features=1, got "
                f"likelihood={likelihood!r}, out_features={out_features}"
            )
        if likelihood == "gaussian" and noise != HETEROSCEDASTIC and out_features != 1:
            raise ValueError(
                f"likelihood='gaussian' needs out_features=1 (one mean per point), got "
                f"out_features={out_features}; use noise='heteroscedastic' for a mean and an sd"
            )
        if noise == HETEROSCEDASTIC:
            out_features = 2  # mean and (softplus-transformed) sd
        self.likelihood = likelihood
        self.activation = activation
        self.noise = noise
        self.noise_prior = tuple(float(v) for v in noise_prior)
        sizes = [in_features, *hidden, out_features]
        self.layers = PyroModule[nn.ModuleList](
            [PyroModule[nn.Linear](a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        # Keep the network's own (fan-in) initial values: a better start than prior draws.
        self._initial = {}
        for i, layer in enumerate(self.layers):
            self._initial[f"layers.{i}.weight"] = layer.weight.detach().clone()
            self._initial[f"layers.{i}.bias"] = layer.bias.detach().clone()
            # Prior parameters are buffers, so the priors follow model.to(device/dtype).
            layer.register_buffer("prior_scale", torch.tensor(float(prior_scale)))
            layer.weight = PyroSample(_LayerPrior("weight"))
            layer.bias = PyroSample(_LayerPrior("bias"))

    def init_loc_fn(self) -> Callable:
        """Initialiser for autoguides: the network's fan-in init, prior median elsewhere."""
        initial = self._initial

        def init(site: dict) -> torch.Tensor:
            value = initial.get(site["name"])
            if value is None:
                return init_to_median(site)
            # a copy on the prior's device and dtype: AutoNormal's loc would share (and
            # train) the stored tensor, and the next guide would start from its fit
            return value.to(site["fn"].mean, copy=True)

        return init

    def net(self, x: torch.Tensor) -> torch.Tensor:
        r"""The network output (B, out_features) for the current (sampled) weights.

        Each layer is ``h -> W h + b`` on the transposed activations (features x B), so that
        under ``vmap`` over weight draws the first layer is one matrix product for all draws.
        ``tanh`` is computed as :math:`\tanh(z) = 2(\sigma(2z) - 1/2)` (one ``sigmoid``,
        several times cheaper than ``torch.tanh`` on CPUs where the latter is not
        vectorized; within ~1e-7 of it in float32): the hidden state carries
        :math:`\sigma(2z) - 1/2` and the factors 2 are applied to the (small) weight
        matrices, which is exact in floating point. Without autograd, bias and activation
        are applied in place.
        """
        if x.dim() < 2 or x.shape[-1] != self.layers[0].in_features:
            raise ValueError(
                f"x must have shape (B, {self.layers[0].in_features}), got x.shape={tuple(x.shape)}"
            )
        h, gain = x.mT, 1  # gain: true hidden values = gain * h
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            pre = 2 if self.activation == "tanh" and not last else 1
            w, b = layer.weight, layer.bias  # the order nn.Linear uses
            z = (w if pre * gain == 1 else w * (pre * gain)) @ h
            b = (b if pre == 1 else b * pre).unsqueeze(-1)
            z = z.add_(b) if _inplace(z) else z + b
            if last:
                h = z
            elif self.activation == "relu":
                h = z.relu_() if _inplace(z) else z.relu()
            else:
                h, gain = (z.sigmoid_().sub_(0.5) if _inplace(z) else z.sigmoid() - 0.5), 2
        return h.mT

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None
    ) -> torch.Tensor:
        out = self.net(x)
        observe(out, y, self.likelihood, self.noise, self.noise_prior, num_data)
        return out
