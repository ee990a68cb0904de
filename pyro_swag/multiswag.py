r"""MultiSWAG: a mixture of independent SWAG runs as one Pyro guide.

Several SWAG runs of the same model (different seeds or initialisations) give Gaussians
:math:`q_r = \mathcal{N}(\mu_r, \Sigma_r)` over the unconstrained latent vector; MultiSWAG
(Wilson & Izmailov 2020) is their mixture

.. math::

    q(\theta) = \sum_{r=1}^{R} \pi_r\, q_r(\theta), \qquad \sum_r \pi_r = 1,

with equal weights :math:`\pi_r = 1/R` by default. :class:`MultiSWAG` is an
:class:`~pyro.infer.autoguide.AutoContinuous`, so it works in ``pyro.infer.Predictive``;
:meth:`MultiSWAG.sample_chains` draws each run separately, which
:func:`pyro_swag.datatree.to_datatree` exports, with equal weights, as one chain per run
(R-hat across chains then says whether the runs found the same mode). With unequal weights
the export draws from the weighted mixture (:meth:`MultiSWAG.sample_mixture`) instead, so
that its draws follow ``q``, the density recorded as ``log_q``.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to
from tqdm.auto import tqdm

from ._fitted import model_of
from .autoguide import FittedContinuous, SWAGGuide

__all__ = ["MultiSWAG", "fit_runs"]


def mixture_quantile(
    mean: torch.Tensor, sd: torch.Tensor, q: float, weights: torch.Tensor | None = None,
    iters: int = 60,
) -> torch.Tensor:
    """Quantile ``q`` of each column's mixture of Normals ``N(mean[r], sd[r])``, rows weighted
    by ``weights`` (equal by default); ``mean`` and ``sd`` are ``(R, ...)``. Bisection."""
    lo = (mean - 10 * sd).min(0).values
    hi = (mean + 10 * sd).max(0).values
    normal = torch.distributions.Normal(mean, sd)
    w = None if weights is None else weights.reshape(-1, *([1] * (mean.dim() - 1)))
    for _ in range(iters):
        mid = (lo + hi) / 2
        cdf = normal.cdf(mid.expand_as(mean))
        below = (cdf.mean(0) if w is None else (w * cdf).sum(0)) < q
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


def _component_parts(guide: SWAGGuide) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loc, cov_factor (P, K'), cov_diag)`` with the covariance of ``guide.get_posterior()``."""
    loc = guide.loc
    if guide.diagonal:
        return loc, loc.new_zeros(loc.numel(), 0), guide.scale * guide.variance
    factor = guide.cov_factor() if guide.rank else loc.new_zeros(loc.numel(), 0)
    return loc, factor.to(loc.dtype), guide.scale * guide.variance / 2


class MultiSWAG(FittedContinuous):
    """Mixture of SWAG Gaussians, one component per independent run.

    Parameters
    ----------
    guides : sequence of SWAGGuide
        Fitted runs of the same model (same latent layout). Their ``scale`` and
        ``diagonal`` settings are read once, here. Runs of different rank are allowed:
        the smaller low-rank factors are padded with zero columns, which leaves each
        component's covariance unchanged.
    weights : sequence of float or torch.Tensor, optional
        Positive mixture weights (normalised here); equal by default.
    model : callable, optional
        The model; defaults to ``guides[0].model``.
    """

    def __init__(
        self,
        guides: Sequence[SWAGGuide],
        weights: Sequence[float] | torch.Tensor | None = None,
        model: Callable | None = None,
    ) -> None:
        if not isinstance(guides, Iterable):  # e.g. one SWAGGuide
            raise TypeError(
                f"guides must be a list of SWAGGuides (one per run), got "
                f"{type(guides).__name__}; pass e.g. MultiSWAG([guide_a, guide_b])"
            )
        guides = list(guides)
        if not guides:
            raise ValueError("guides is empty; pass at least one fitted SWAGGuide")
        for i, g in enumerate(guides):
            if not isinstance(g, SWAGGuide):
                raise TypeError(
                    f"guides[{i}] is a {type(g).__name__}, expected a SWAGGuide "
                    "(from SWAGCollector.swag_guide() or SWAGGuide.from_state_dict())"
                )
        first = guides[0]
        model = model if model is not None else model_of(first)
        if model is None:
            raise TypeError(
                "guides[0] has no model (a guide loaded with torch.load: Pyro does not pickle "
                "a guide's model); pass MultiSWAG(guides, model=model)"
            )
        super().__init__(model)
        size = first.loc.numel()
        layout = next((g.layout for g in guides if g.layout), None)
        ref = next((i for i, g in enumerate(guides) if g.layout), 0)
        for i, g in enumerate(guides):
            if g.loc.numel() != size:
                raise ValueError(
                    f"guides[{i}] has {g.loc.numel()} latent entries but guides[0] has {size}; "
                    "all runs must come from the same model"
                )
            if (g.loc.dtype, g.loc.device) != (first.loc.dtype, first.loc.device):
                raise TypeError(
                    f"guides[{i}] has dtype={g.loc.dtype} on {g.loc.device} but guides[0] has "
                    f"dtype={first.loc.dtype} on {first.loc.device}; fit every run with the "
                    "same model dtype and device"
                )
            if g.layout and [tuple(s) for s in g.layout] != [tuple(s) for s in layout]:
                raise ValueError(
                    f"guides[{i}] has latent layout {g.layout} but guides[{ref}] has "
                    f"{layout}; all runs must come from the same model"
                )
        parts = [_component_parts(g) for g in guides]
        device, dtype = first.loc.device, first.loc.dtype
        rank = max(1, max(p[1].shape[1] for p in parts))
        factors = torch.zeros(len(parts), size, rank, dtype=dtype, device=device)
        for r, (_, f, _) in enumerate(parts):
            factors[r, :, : f.shape[1]] = f.to(device)
        self.register_buffer("loc", torch.stack([p[0].to(device, dtype) for p in parts]))
        self.register_buffer("cov_factor", factors)
        self.register_buffer("cov_diag", torch.stack([p[2].to(device, dtype) for p in parts]))
        self.register_buffer("weights", self._check_weights(weights, len(parts), device, dtype))
        self.layout = layout

    @staticmethod
    def _check_weights(weights, num_runs: int, device, dtype) -> torch.Tensor:
        if weights is None:
            return torch.full((num_runs,), 1.0 / num_runs, device=device, dtype=dtype)
        bad = ValueError(
            f"weights must be {num_runs} positive finite numbers (one per run), got "
            f"weights={weights!r}"
        )
        try:
            w = torch.as_tensor(weights, dtype=torch.float64).to(device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise bad from err
        if w.shape != (num_runs,) or not bool(torch.all(w > 0)) or not bool(w.isfinite().all()):
            raise bad
        return (w / w.sum()).to(dtype)

    @property
    def num_runs(self) -> int:
        """Number of mixture components ``R``."""
        return self.loc.shape[0]

    def components(self) -> dist.LowRankMultivariateNormal:
        """The R run Gaussians as one batched distribution, batch shape ``(R,)``."""
        return dist.LowRankMultivariateNormal(self.loc, self.cov_factor, self.cov_diag)

    def get_posterior(self, *args, **kwargs) -> dist.MixtureSameFamily:
        """``MixtureSameFamily(Categorical(weights), LowRankMultivariateNormal)``."""
        return dist.MixtureSameFamily(dist.Categorical(probs=self.weights), self.components())

    def get_transform(self, *args, **kwargs):
        """Refused: no affine map whitens a mixture (Pyro's ``NeuTraReparam`` asks for one)."""
        raise NotImplementedError(
            "MultiSWAG is a mixture of R Gaussians, which no single affine transform maps "
            "N(0, I) onto; whiten NUTS by one run's SWAGGuide instead, e.g. "
            "NeuTraReparam(guides[0]) of the guides MultiSWAG was built from"
        )

    def marginal_variance(self) -> torch.Tensor:
        r"""Per-entry mixture variance :math:`\sum_r \pi_r(\sigma^2_r + \mu_r^2) - \bar\mu^2`."""
        var_r = self.cov_diag + self.cov_factor.pow(2).sum(-1)
        mean = self.weights @ self.loc
        return (self.weights @ (var_r + self.loc.pow(2)) - mean.pow(2)).clamp(min=0)

    def _loc_scale(self, *args, **kwargs):
        return self.weights @ self.loc, self.marginal_variance().sqrt()

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Marginal quantiles of each latent site under the mixture (constrained).

        Each unconstrained entry's marginal is the mixture of the runs' Normal marginals;
        its quantiles come from bisection of that mixture's CDF.
        """
        self._set_up_for("quantiles()", args, kwargs)
        sd = (self.cov_diag + self.cov_factor.pow(2).sum(-1)).sqrt()
        levels = torch.as_tensor(quantiles, dtype=self.loc.dtype).reshape(-1).tolist()
        latents = [mixture_quantile(self.loc, sd, q, self.weights) for q in levels]
        out: dict[str, list] = {}
        for latent in latents:
            for site, value in self._unpack_latent(latent):
                out.setdefault(site["name"], []).append(biject_to(site["fn"].support)(value))
        return {k: torch.stack(v) for k, v in out.items()}

    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Per-entry median of the mixture's marginals (constrained)."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}

    @torch.no_grad()
    def sample_chains(self, num_draws: int) -> torch.Tensor:
        """Draw ``num_draws`` latents from every run: shape ``(R, num_draws, P)``.

        Pooled, a (stratified) sample of the *equal*-weight mixture; for unequal ``weights``
        draw from the mixture with :meth:`sample_mixture`.
        """
        if isinstance(num_draws, bool) or not (isinstance(num_draws, int) and num_draws > 0):
            raise ValueError(f"num_draws must be a positive int, got num_draws={num_draws!r}")
        return self.components().sample((num_draws,)).transpose(0, 1)

    @torch.no_grad()
    def sample_mixture(self, num_draws: int) -> torch.Tensor:
        """Draw ``num_draws`` latents from the weighted mixture: shape ``(num_draws, P)``.

        Each draw picks run ``r`` with probability ``weights[r]`` and samples that run's
        Gaussian: ``get_posterior().sample((num_draws,))`` in law, without drawing from
        every component (memory ``num_draws x P``, not ``num_draws x R x P``).
        """
        if isinstance(num_draws, bool) or not (isinstance(num_draws, int) and num_draws > 0):
            raise ValueError(f"num_draws must be a positive int, got num_draws={num_draws!r}")
        runs = dist.Categorical(probs=self.weights).sample((num_draws,))
        out = self.loc.new_empty(num_draws, self.loc.shape[-1])
        for r in range(self.num_runs):
            pick = runs == r
            count = int(pick.sum())
            if count:
                run = dist.LowRankMultivariateNormal(
                    self.loc[r], self.cov_factor[r], self.cov_diag[r]
                )
                out[pick] = run.sample((count,))
        return out

    # ------------------------------------------------------------- persistence
    def get_extra_state(self) -> dict[str, Any]:
        return {"layout": self.layout}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.layout = state["layout"]

    @classmethod
    def from_state_dict(cls, model: Callable, state_dict: dict[str, Any]) -> MultiSWAG:
        """Rebuild a mixture saved with ``torch.save(guide.state_dict(), path)``.

        Load the file with ``torch.load(path, weights_only=True)``.
        """
        names = ("loc", "cov_factor", "cov_diag", "weights")
        missing = sorted(set(names) - set(state_dict))
        if missing:
            raise ValueError(
                f"state_dict lacks {missing}; pass the output of MultiSWAG.state_dict()"
            )
        loc, factor, diag, w = (state_dict[n] for n in names)
        runs = loc.shape[0] if loc.dim() == 2 else 0
        shapes_ok = diag.shape == loc.shape and factor.dim() == 3 and factor.shape[:2] == loc.shape
        if not (runs and shapes_ok):
            raise ValueError(
                f"state_dict holds loc {tuple(loc.shape)}, cov_factor {tuple(factor.shape)} and "
                f"cov_diag {tuple(diag.shape)}; they must be (R, P), (R, P, K) and (R, P): pass "
                "the output of MultiSWAG.state_dict()"
            )
        guide = cls.__new__(cls)
        FittedContinuous.__init__(guide, model)
        for name in names[:3]:
            guide.register_buffer(name, state_dict[name].clone())
        guide.register_buffer("weights", cls._check_weights(w, runs, loc.device, loc.dtype))
        layout = state_dict.get("_extra_state", {}).get("layout")
        guide.layout = [(n, tuple(s)) for n, s in layout] if layout else None
        return guide


def _fit_one(fit_run: Callable[[int], SWAGGuide], seed: int, threads: int | None):
    """Worker: seed everything, fit one run, return its state dict on the CPU."""
    if threads:
        torch.set_num_threads(threads)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = fit_run(seed)
    if not isinstance(guide, SWAGGuide):
        raise TypeError(f"fit_run({seed}) returned a {type(guide).__name__}, expected a SWAGGuide")
    state = guide.state_dict()
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state.items()}


def fit_runs(
    fit_run: Callable[[int], SWAGGuide],
    seeds: int | Sequence[int] = 4,
    *,
    model: Callable | None = None,
    processes: int = 1,
    threads_per_process: int | None = 1,
    weights: Sequence[float] | None = None,
    progress: bool = True,
) -> MultiSWAG:
    """Fit independent SWAG runs and combine them into a :class:`MultiSWAG`.

    Parameters
    ----------
    fit_run : callable
        ``fit_run(seed) -> SWAGGuide``: trains one run. It is called after
        ``pyro.set_rng_seed(seed)`` and ``pyro.clear_param_store()``. With
        ``processes > 1`` it must be picklable (a module-level function or a
        ``functools.partial`` of one).
    seeds : int or sequence of int
        The seeds, or a number R meaning seeds ``0..R-1``.
    model : callable, optional
        The model of the runs. Required with ``processes > 1``: the runs come back as
        state dicts and are rebuilt with :meth:`SWAGGuide.from_state_dict` on it.
    processes : int
        Worker processes (``spawn`` context); 1 runs in this process.
    threads_per_process : int or None
        ``torch.set_num_threads`` in each worker; ``None`` leaves torch's default.
    weights : sequence of float, optional
        Mixture weights, see :class:`MultiSWAG`.
    progress : bool
        Show a tqdm bar over runs.

    Returns
    -------
    MultiSWAG
        One component per seed, in the order of ``seeds``.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)):
        raise TypeError(f"seeds must be a number of runs or a list of seeds, got seeds={seeds!r}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; pass a positive number of runs or a list of seeds")
    if not (isinstance(processes, int) and processes >= 1):
        raise ValueError(f"processes must be an int >= 1, got processes={processes!r}")
    if processes == 1:
        guides = []
        for seed in tqdm(seeds, desc="SWAG runs", disable=not progress):
            pyro.set_rng_seed(seed)
            pyro.clear_param_store()
            guide = fit_run(seed)
            if not isinstance(guide, SWAGGuide):
                raise TypeError(
                    f"fit_run({seed}) returned a {type(guide).__name__}, expected a SWAGGuide"
                )
            guides.append(guide)
        return MultiSWAG(guides, weights=weights, model=model)
    if model is None:
        raise ValueError(
            "model=None with processes > 1: pass model=the model fit_run trains, so the "
            "runs can be rebuilt in this process"
        )
    ctx = multiprocessing.get_context("spawn")
    # an executor, not a Pool: a worker that dies (e.g. a script without the
    # `if __name__ == "__main__":` guard that spawn needs) raises instead of hanging
    with ProcessPoolExecutor(min(processes, len(seeds)), mp_context=ctx) as pool:
        jobs = [pool.submit(_fit_one, fit_run, s, threads_per_process) for s in seeds]
        try:
            states = [job.result() for job in tqdm(jobs, desc="SWAG runs",
                                                     disable=not progress)]
        except BrokenProcessPool as err:
            raise RuntimeError(
                "a fit_runs worker process died before returning its run; with processes > 1 "
                "the calling script must guard its top level with "
                "`if __name__ == \"__main__\":` (workers are spawned and import it), and "
                "fit_run must not exit the process"
            ) from err
    guides = [SWAGGuide.from_state_dict(model, state) for state in states]
    return MultiSWAG(guides, weights=weights, model=model)
