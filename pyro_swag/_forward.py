"""The torch-module route of :mod:`pyro_swag.predictive`: a plain ``nn.Module`` at S
parameter draws, vectorized with ``vmap``, with BatchNorm statistics re-estimated per draw."""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ._vectorize import _chunks, _num_draws

__all__ = ["forward_draws"]


def forward_draws(
    net: torch.nn.Module,
    params: dict[str, torch.Tensor],
    *args,
    loader: Any = None,
    bn_update: bool | None = None,
    chunk_size: int | None = None,
    **kwargs,
) -> Any:
    """Outputs of a plain ``nn.Module`` at S parameter draws, vectorized with ``vmap``.

    The vectorized form of "for each draw: load the parameters, refresh BatchNorm over the
    training loader (:func:`torch.optim.swa_utils.update_bn`), run forward in eval mode".
    As in ``update_bn`` the refresh runs the whole net in train mode: Dropout is active
    there, with independent randomness per draw.

    Parameters
    ----------
    net : nn.Module
        The network; left unchanged (parameters, buffers, mode, momentum).
    params : dict
        ``{parameter name: (S, *shape)}``, e.g. ``ModuleSWAG.unflatten(thetas)``; parameters
        not given keep the net's values.
    *args, **kwargs
        Forward arguments (e.g. ``x``).
    loader : iterable, optional
        Batches (``x`` or ``(x, ...)``) over which BatchNorm statistics are re-estimated
        for every draw.
    bn_update : bool, optional
        Refresh BatchNorm statistics (default: when the net has BatchNorm layers).
    chunk_size : int, optional
        Draws evaluated together.

    Returns
    -------
    torch.Tensor (or the forward's pytree)
        Outputs stacked over draws, ``(S, *out)``.
    """
    num = _num_draws(params, "params")
    unknown = sorted(set(params) - {n for n, _ in net.named_parameters()})
    if unknown:
        raise ValueError(f"params has {unknown}, not parameters of the network")
    norms = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if bn_update is None:
        bn_update = bool(norms)
    if bn_update and loader is None:
        raise ValueError(
            "bn_update needs loader=<training DataLoader> to re-estimate BatchNorm statistics "
            "for each draw (or bn_update=False to keep the net's statistics)"
        )
    outs = []
    for c in _chunks(num, chunk_size):
        chunk = {k: v[c] for k, v in params.items()}
        buffers = _refresh_norms(net, chunk, loader) if bn_update and norms else {}

        def run(p, b):
            return functional_call(net, {**p, **b}, args, kwargs)

        modes = _modes(net)
        try:
            net.eval()
            with torch.no_grad():
                outs.append(torch.func.vmap(run)(chunk, buffers))
        finally:
            _restore(modes)
    return torch.utils._pytree.tree_map(lambda *t: torch.cat(t), *outs)


def _refresh_norms(net, params: dict, loader) -> dict[str, torch.Tensor]:
    """Per-draw BatchNorm statistics, as ``update_bn`` (cumulative average over ``loader``).

    As in ``update_bn`` the net runs in train mode, so random train-mode layers (Dropout)
    are active, with independent randomness per draw (``vmap(randomness="different")``).
    """
    num = next(iter(params.values())).shape[0]
    batched, shared, saved = {}, {}, []
    for name, module in net.named_modules():
        if not (isinstance(module, _BatchNorm) and module.track_running_stats):
            continue
        prefix = f"{name}." if name else ""
        mean = module.running_mean
        batched[prefix + "running_mean"] = mean.new_zeros((num,) + mean.shape)
        batched[prefix + "running_var"] = mean.new_ones((num,) + mean.shape)
        shared[prefix + "num_batches_tracked"] = torch.zeros_like(module.num_batches_tracked)
        saved.append((module, module.momentum))
    device = next(iter(params.values())).device

    def step(p, b, x):
        functional_call(net, {**p, **b, **shared}, (x,))
        return b

    modes = _modes(net)
    try:
        for module, _ in saved:
            module.momentum = None
        net.train()
        with torch.no_grad():
            for batch in loader:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                # the whole net in train mode, as update_bn: Dropout (any random train-mode
                # layer) draws independently for every draw of the parameters
                refresh = torch.func.vmap(step, in_dims=(0, 0, None), randomness="different")
                refresh(params, batched, x.to(device))
    finally:
        for module, momentum in saved:
            module.momentum = momentum
        _restore(modes)
    return batched


def _modes(net) -> list:
    """Every submodule's train/eval flag (``net.train(flag)`` would set them all alike)."""
    return [(m, m.training) for m in net.modules()]


def _restore(modes: list) -> None:
    for module, training in modes:
        module.training = training
