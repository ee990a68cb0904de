"""A NUTS kernel that records the per-draw statistics ArviZ reports (for
:mod:`pyro_swag.datatree`)."""

from __future__ import annotations

from pyro.infer import NUTS

__all__ = ["RecordingNUTS"]


class RecordingNUTS(NUTS):
    """``pyro.infer.NUTS`` that also records, per kept draw, what ArviZ reports.

    Pyro's MCMC keeps only the indices of divergent draws; with this kernel
    :func:`to_datatree` adds ``tree_depth``, ``n_steps`` (leapfrog steps), the per-draw
    ``step_size`` and ``energy`` to ``sample_stats``. ``energy`` is the Hamiltonian
    :math:`H = U(z) + K(r)` (potential: the negative log joint of the unconstrained latents)
    after the momentum is drawn, the level the transition's trajectory keeps, as ArviZ's
    ``bfmi`` and ``plot_energy`` expect. Only for chains run in this process (one chain, or
    several with ``mp_context=None`` and sequential chains). ``chain_stats`` holds one list
    per chain set up (Pyro sets the kernel up once per chain).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chain_stats: list[list[tuple[int, int, float, float]]] = []

    def setup(self, warmup_steps, *args, **kwargs):
        self.chain_stats.append([])
        self._nest = self._depth = self._leaves = 0
        return super().setup(warmup_steps, *args, **kwargs)

    def _build_basetree(self, *args, **kwargs):
        self._leaves += 1
        return super()._build_basetree(*args, **kwargs)

    def _build_tree(self, *args, **kwargs):
        if self._nest == 0:  # one top-level call per doubling, all at the same energy
            self._depth += 1
            self._energy = args[6] if len(args) > 6 else kwargs.get("energy_current", self._energy)
        self._nest += 1
        try:
            return super()._build_tree(*args, **kwargs)
        finally:
            self._nest -= 1

    def sample(self, params):
        self._depth = self._leaves = 0
        self._energy = float("nan")
        step_size = float(self.step_size)
        out = super().sample(params)
        if self._t > self._warmup_steps:
            self.chain_stats[-1].append((self._depth, self._leaves, step_size, float(self._energy)))
        return out
