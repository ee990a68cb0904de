r"""An affine bijection of :math:`\mathbb{R}^P` onto a diagonal-plus-low-rank Gaussian.

For :math:`\Sigma = \operatorname{diag}(d) + W W^\top` (:math:`W \in \mathbb{R}^{P \times K}`)
write :math:`U = d^{-1/2} W = Q \Lambda R^\top` (thin SVD). Then
:math:`\Sigma = d^{1/2} (I + Q \Lambda^2 Q^\top) d^{1/2}`, and the symmetric square root of the
middle factor is :math:`I + Q C Q^\top` with :math:`C = \sqrt{1 + \Lambda^2} - 1`, so

.. math::

    x = \mu + d^{1/2} \odot \big(z + Q\, (c \odot Q^\top z)\big), \qquad
    \log |\det J| = \tfrac12 \textstyle\sum_i \log d_i
    + \tfrac12 \textstyle\sum_k \log(1 + \lambda_k^2)

maps :math:`z \sim \mathcal{N}(0, I_P)` onto :math:`\mathcal{N}(\mu, \Sigma)` at
:math:`O(PK)` per point, without forming a :math:`P \times P` matrix; the inverse replaces
:math:`c` by :math:`1 / \sqrt{1 + \lambda^2} - 1`. This is what
:class:`pyro.infer.reparam.NeuTraReparam` needs of a guide (``get_transform``).
"""

from __future__ import annotations

import torch
from torch.distributions import Transform, constraints


class LowRankAffine(Transform):
    """``z -> loc + sqrt(cov_diag) * (z + Q (c * Q^T z))``, see the module docstring.

    Parameters
    ----------
    loc, cov_diag : torch.Tensor
        Mean and diagonal part ``d`` of the covariance, shape (P,).
    cov_factor : torch.Tensor
        Low-rank factor ``W``, shape (P, K); K may be 0.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, loc: torch.Tensor, cov_diag: torch.Tensor, cov_factor: torch.Tensor,
                 cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.loc, self.sd = loc, cov_diag.sqrt()
        if cov_factor.shape[-1]:
            q, lam, _ = torch.linalg.svd(cov_factor / self.sd[:, None], full_matrices=False)
        else:  # no low-rank part: a diagonal affine map
            q, lam = cov_factor, cov_factor.new_zeros(0)
        root = (1 + lam.square()).sqrt()
        self.q, self.c, self.c_inv = q, root - 1, root.reciprocal() - 1
        self._logdet = self.sd.log().sum() + root.log().sum()

    def _mix(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return v + ((v @ self.q) * c) @ self.q.T

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        return self.loc + self.sd * self._mix(z, self.c)

    def _inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix((x - self.loc) / self.sd, self.c_inv)

    def log_abs_det_jacobian(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._logdet.expand(z.shape[:-1])
