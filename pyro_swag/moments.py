r"""Running SWAG moments of a trajectory of flat parameter vectors.

Given snapshots :math:`\theta_1, \dots, \theta_n \in \mathbb{R}^P` this module keeps

* the mean :math:`\mu_n = \frac1n \sum_i \theta_i`,
* the diagonal variance :math:`\Sigma_{\rm diag} = \frac1n \sum_i \theta_i^2 - \mu_n^2`
  (clamped below at ``min_var``),
* the last :math:`K' = \min(K, n - 1)` deviations :math:`d_i = \theta_i - \mu_i`, where
  :math:`\mu_i` is the running mean *after* adding :math:`\theta_i`, for :math:`i \ge 2`
  (the first deviation is identically zero and is not stored).

The variance is accumulated with Welford's update, whose increment is the very deviation
row SWAG stores: with :math:`\delta = \theta_n - \mu_{n-1}`,

.. math::

    \mu_n = \mu_{n-1} + \delta / n, \qquad
    d_n = \theta_n - \mu_n = \delta (n - 1) / n, \qquad
    M_n = M_{n-1} + \delta \, d_n = M_{n-1} + \tfrac{n}{n-1} d_n^2, \qquad
    \Sigma_{\rm diag} = M_n / n .

Unlike the textbook :math:`\overline{\theta^2} - \mu^2`, this keeps its digits in float32
when the spread is tiny compared with the mean. Deviations live in a preallocated
``rank x P`` ring buffer, so one snapshot costs :math:`O(P)` whatever the rank.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
from torch import nn

from ._checks import is_int, is_real

__all__ = ["SWAGMoments", "unmoved", "unmoved_quietly", "warn_unmoved"]


def unmoved(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    r"""Boolean mask of the coordinates that a trajectory with these moments did not move.

    A coordinate counts as unmoved when
    :math:`\Sigma_{\rm diag} \le (16\,\varepsilon \max(|\mu|, 1))^2` (:math:`\varepsilon`
    the dtype's machine epsilon), no spread on the scale of the unconstrained space: SGD's
    gradient there carried no minibatch noise (e.g. a direction set by the prior alone), so
    SWAG gives it no spread however wide the posterior is.
    """
    tol = 16 * torch.finfo(mean.dtype).eps * mean.abs().clamp(min=1)
    return variance <= tol.square()


def warn_unmoved(counts: dict[str, int], size: int, snapshots: int, stacklevel: int = 2) -> None:
    """Warn that SWAG has no spread in some coordinates; ``counts``: unmoved ones by name."""
    where = ", ".join(f"{name!r}: {c}" for name, c in counts.items() if c)
    warnings.warn(
        f"SWAG: {sum(counts.values())} of {size} coordinates did not move over the "
        f"{snapshots} snapshots ({where}): SGD's gradient there had no minibatch noise, so the "
        "guide gives them no spread, whatever their posterior. Typical causes: latents the "
        "data do not inform (weights of a constant input or of a hidden unit the fit "
        "switched off, a Dirichlet component the likelihood ignores), or an SWA rate too "
        "small to move them. There the importance weights p/q of PSIS and the corrected LOO "
        "have infinite variance, which a k-hat from a few hundred draws can miss, and for "
        "switched-off units the predictions away from the data lack spread; see docs/swag.md",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


@contextlib.contextmanager
def unmoved_quietly():
    """Silence :func:`warn_unmoved` inside the block (for callers that report it otherwise)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SWAG: .* did not move", category=RuntimeWarning)
        yield


class SWAGMoments(nn.Module):
    """Mean, diagonal variance and last ``rank`` deviations of a stream of vectors.

    Parameters
    ----------
    rank : int
        Number of deviation rows kept (``K`` in the paper), at least 1.
    min_var : float
        Lower clamp of the diagonal variance.
    deviation_dtype : torch.dtype, optional
        Storage dtype of the deviation buffer (e.g. ``torch.bfloat16`` to halve its
        memory); defaults to the snapshots' dtype.
    device : torch.device or str, optional
        Where the moments live; defaults to the first snapshot's device. Set it to
        ``"cpu"`` to offload the moments of a GPU trajectory.

    Notes
    -----
    Buffers are allocated on the first :meth:`update` (or by :meth:`load_state_dict`),
    so the module's ``state_dict`` round-trips through ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        rank: int = 20,
        min_var: float = 1e-30,
        deviation_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not is_int(rank):
            raise ValueError(f"rank must be an integer >= 1, got rank={rank!r}; use e.g. rank=20")
        if not (is_real(min_var) and 0 <= min_var < math.inf):
            raise ValueError(
                f"min_var must be a finite number >= 0, got min_var={min_var!r}; use e.g. 1e-30"
            )
        if deviation_dtype is not None and not (
            isinstance(deviation_dtype, torch.dtype) and deviation_dtype.is_floating_point
        ):
            raise TypeError(
                f"deviation_dtype must be a floating torch.dtype or None, got "
                f"deviation_dtype={deviation_dtype!r}; use e.g. deviation_dtype=torch.bfloat16"
            )
        self.rank = int(rank)
        self.min_var = float(min_var)
        self.deviation_dtype = deviation_dtype
        self.device = None if device is None else torch.device(device)
        self.count = 0
        self._head = 0
        self.register_buffer("mean", None)
        self.register_buffer("m2", None)
        self.register_buffer("deviations", None)

    # ------------------------------------------------------------------ state
    @property
    def num_features(self) -> int | None:
        """Length ``P`` of the vectors, or ``None`` before the first snapshot."""
        return None if self.mean is None else self.mean.numel()

    @property
    def num_deviations(self) -> int:
        """Number of deviation rows held, ``min(rank, count - 1)``."""
        return min(self.rank, max(self.count - 1, 0))

    def _allocate(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        dev_dtype = self.deviation_dtype or dtype
        mean = torch.zeros(size, dtype=dtype, device=device)  # all three, then assign
        m2 = torch.zeros(size, dtype=dtype, device=device)
        deviations = torch.zeros(self.rank, size, dtype=dev_dtype, device=device)
        self.mean, self.m2, self.deviations = mean, m2, deviations

    def check(self, theta: torch.Tensor, name: str = "theta") -> None:
        """Raise a clear error when ``theta`` cannot be the next snapshot."""
        if not isinstance(theta, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(theta).__name__}")
        if theta.dim() != 1:
            raise ValueError(
                f"{name} must be a flat vector, got shape {tuple(theta.shape)}; "
                "flatten it with .reshape(-1)"
            )
        if not theta.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype={theta.dtype}")
        if self.mean is not None:
            if theta.numel() != self.mean.numel():
                raise ValueError(
                    f"{name} has {theta.numel()} entries but the collected snapshots have "
                    f"{self.mean.numel()}; pass a vector of the model's latent size"
                )
            if theta.dtype != self.mean.dtype:
                raise TypeError(
                    f"{name} has dtype={theta.dtype} but the collected snapshots have "
                    f"dtype={self.mean.dtype}; convert it with .to({self.mean.dtype})"
                )
        # A finite sum proves every entry finite, in one pass and without a temporary.
        if not torch.isfinite(theta.sum()) and not bool(torch.isfinite(theta).all()):
            raise ValueError(
                f"{name} contains NaN or Inf; the trajectory diverged (lower the learning "
                "rate or clip gradients); nothing was collected"
            )

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, theta: torch.Tensor) -> None:
        """Add one snapshot (a flat vector) to the moments, in :math:`O(P)`."""
        self.check(theta)
        if self.mean is None:
            self._allocate(theta.numel(), theta.dtype, self.device or theta.device)
        theta = theta.to(self.mean.device)
        self.count += 1
        n = self.count
        if n == 1:
            self.mean.copy_(theta)
            return
        row = self.deviations[self._head]
        dev = row if row.dtype == theta.dtype else torch.empty_like(theta)
        self.mean.lerp_(theta, 1.0 / n)  # mu_n = mu_{n-1} + (theta - mu_{n-1}) / n
        torch.sub(theta, self.mean, out=dev)  # d_n = theta - mu_n
        self.m2.addcmul_(dev, dev, value=n / (n - 1))  # += delta * d_n, delta = d_n n / (n-1)
        if dev is not row:
            row.copy_(dev)
        self._head = (self._head + 1) % self.rank

    # ---------------------------------------------------------------- results
    def _require(self, at_least: int) -> None:
        if self.count < at_least:
            raise RuntimeError(
                f"{self.count} snapshot(s) collected, need at least {at_least}; "
                "collect more snapshots first"
            )

    def variance(self) -> torch.Tensor:
        r"""Diagonal variance :math:`\max(M_n / n, \text{min\_var})`."""
        self._require(1)
        return (self.m2 / self.count).clamp_(min=self.min_var)

    def deviation_matrix(self) -> torch.Tensor:
        """The ``K' x P`` deviations held, oldest first, in the buffer's dtype (a copy)."""
        self._require(1)
        k = self.num_deviations
        if k < self.rank:
            return self.deviations[:k].clone()
        return torch.roll(self.deviations, -self._head, dims=0)

    # ------------------------------------------------------------- persistence
    def get_extra_state(self) -> dict[str, Any]:
        return {"count": self.count, "head": self._head, "rank": self.rank, "min_var": self.min_var}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self._head = int(state["head"])
        self.min_var = float(state["min_var"])

    def check_state(
        self, state_dict: dict[str, Any], prefix: str = "", dtype: torch.dtype | None = None
    ) -> None:
        """Raise, before anything is loaded, when ``state_dict`` cannot restore these moments.

        ``dtype`` is the dtype the snapshots will have (the model's); by default that of the
        moments already held, if any.
        """
        extra = state_dict.get(prefix + "_extra_state")
        if not isinstance(extra, dict) or not {"count", "head", "rank", "min_var"} <= set(extra):
            raise ValueError(
                f"state_dict lacks {prefix}_extra_state (count, head, rank, min_var); pass "
                "the whole output of state_dict()"
            )
        if int(extra["rank"]) != self.rank:
            raise ValueError(
                f"cannot load moments of rank={extra['rank']} into a collector of "
                f"rank={self.rank}; construct it with rank={extra['rank']}"
            )
        mean = state_dict.get(prefix + "mean")
        if mean is None:
            return
        m2, dev = state_dict.get(prefix + "m2"), state_dict.get(prefix + "deviations")
        if m2 is None or dev is None or m2.shape != mean.shape or tuple(dev.shape) != (
            self.rank, *mean.shape
        ):
            raise ValueError(
                f"state_dict holds {prefix}mean but not a matching {prefix}m2 and "
                f"{prefix}deviations; pass the whole output of state_dict()"
            )
        if self.mean is not None and mean.shape != self.mean.shape:
            raise ValueError(
                f"cannot load moments of {mean.numel()} parameters into moments of "
                f"{self.mean.numel()}; the checkpoint belongs to another model"
            )
        want = dtype if dtype is not None else getattr(self.mean, "dtype", None)
        if want is not None and mean.dtype != want:
            raise TypeError(
                f"the checkpoint's moments have dtype={mean.dtype} but the snapshots have "
                f"dtype={want}; load it into a model of dtype {mean.dtype}, or convert the "
                f"model first"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        if prefix and not any(k.startswith(prefix) for k in state_dict):  # a parent, strict=False
            return
        self.check_state(state_dict, prefix)
        mean = state_dict.get(prefix + "mean")
        if mean is None:  # saved before the first snapshot: start afresh
            self.mean = self.m2 = self.deviations = None
        elif self.mean is None:
            dev = state_dict[prefix + "deviations"]
            self.deviation_dtype = self.deviation_dtype or dev.dtype
            self._allocate(mean.numel(), mean.dtype, self.device or mean.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
