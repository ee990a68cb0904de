"""SWAG under torch.distributed: 2 gloo processes against single-process Pyro SVI."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import _dist_worker as w
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_swag import SWAGCollector, SWAGGuide
from pyro_swag.distributed import DistributedSWAG, default_backend, gather_runs, split_runs

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd``; on timeout stop the launcher *and* its workers, then fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (each in its own session) on SIGTERM
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{cmd} ran over {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch: DDP (sharded, rank 0), MultiSWAG, then a crash and a restart."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [*LAUNCH, "--max-restarts=1", str(ROOT / "tests" / "_dist_worker.py"), str(out)]
    proc = _run(cmd, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _load(path: Path, model) -> SWAGGuide:
    return SWAGGuide.from_state_dict(model, torch.load(path, weights_only=True))


def _assert_guides_close(got: SWAGGuide, want: SWAGGuide, exact: bool = False) -> None:
    for name in ("loc", "variance", "deviations"):
        a, b = getattr(got, name), getattr(want, name)
        if exact:
            assert torch.equal(a, b), name
        else:  # float32 all-reduce sums in another order than one process
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("shard", [True, False])
def test_two_rank_guide_equals_single_process_guide(launched, shard):
    ref = w.reference(0)
    assert ref.rank == w.RANK and ref.variance.max() > 1e-4  # a real, non-degenerate spread
    got = _load(launched / f"guide-shard{shard}.pt", ref.model)
    _assert_guides_close(got, ref)


def test_bfloat16_deviations_travel_in_their_dtype(launched):
    ref = w.reference(0, torch.bfloat16)
    got = _load(launched / "guide-bf16.pt", ref.model)
    assert got.deviations.dtype == torch.bfloat16
    torch.testing.assert_close(got.loc, ref.loc, rtol=1e-4, atol=1e-5)
    scale = float(ref.deviations.float().abs().max())
    torch.testing.assert_close(  # one bf16 rounding step (2^-8 relative) apart at most
        got.deviations.float(), ref.deviations.float(), rtol=1e-2, atol=1e-2 * scale
    )


def test_guide_gathered_to_every_rank_is_identical(launched):
    ref = w.reference(0)
    g0 = _load(launched / "guide-all-rank0.pt", ref.model)
    g1 = _load(launched / "guide-all-rank1.pt", ref.model)
    _assert_guides_close(g1, g0, exact=True)
    _assert_guides_close(g0, _load(launched / "guide-shardTrue.pt", ref.model), exact=True)


def test_sharded_moments_gathered_to_rank_1_equal_single_process_store(launched):
    want = w.reference_collector(0).moments.state_dict()
    got = torch.load(launched / "moments-rank1.pt", weights_only=True)
    assert got["_extra_state"] == want["_extra_state"]  # count, ring-buffer head, rank
    for name in ("mean", "m2", "deviations"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_sharded_moments_split_memory(launched):
    info = [json.loads((launched / f"info-rank{r}.json").read_text()) for r in (0, 1)]
    p = info[0]["shard=True"]["P"]
    full = (w.RANK + 2) * p * 4  # float32 mean, m2 and K deviation rows in one process
    sharded = [i["shard=True"] for i in info]
    assert [s["bounds"] for s in sharded] == [[0, (p + 1) // 2], [(p + 1) // 2, p]]
    assert sum(s["bytes"] for s in sharded) == full
    assert max(s["bytes"] for s in sharded) == (w.RANK + 2) * ((p + 1) // 2) * 4  # ~ full / 2
    assert [i["shard=False"]["bytes"] for i in info] == [full, 0]


def test_checkpoint_torn_across_ranks_is_refused_on_every_rank(launched):
    for r in (0, 1):
        info = json.loads((launched / f"info-rank{r}.json").read_text())
        assert "different steps (-1..30" in info["torn_checkpoint"]


def test_a_save_cut_short_on_one_rank_resumes_every_rank_from_the_step_before(launched):
    for r in (0, 1):
        got = json.loads((launched / f"info-rank{r}.json").read_text())["interrupted_save"]
        assert got["resumed"] and got["step"] == 12 and got["same_point"], got
        assert len(got["warnings"]) == 1 and "steps 12..14" in got["warnings"][0]


def test_ranks_that_disagree_raise_on_every_rank(launched):
    for r in (0, 1):
        errors = json.loads((launched / f"info-rank{r}.json").read_text())["mismatched"]
        assert f"rank (deviations kept) (from {w.RANK} to {w.RANK + 1}, here {w.RANK + r})" in (
            errors["rank"])
        assert f"snapshots collected (from 2 to 3, here {2 + r})" in errors["snapshots"]


def test_a_models_own_parameter_is_trained_and_replicated(launched):
    got = [json.loads((launched / f"info-rank{r}.json").read_text())["param_model"]
           for r in (0, 1)]
    assert got[0] == got[1]  # rank 1 started from sigma = 3: set-up copied rank 0's
    ref = w.train_param_model(0, 1)
    assert ref[0] < 0.9  # it moved from its start of 1
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_misused_gather_runs_raises_on_every_rank(launched):
    for rank in (0, 1):
        errors = json.loads((launched / f"info-rank{rank}.json").read_text())["misuse"]
        assert errors["group"].startswith("ValueError") and "group=runs.group" in errors["group"]
        assert errors["snapshots"].startswith("RuntimeError") and "one run has 1" in errors[
            "snapshots"]


def test_checkpoint_of_another_world_size_is_refused_not_ignored(launched):
    x, y = w.make_data()
    args, kwargs = w.microbatch(0, 0, 0, 1, x, y)
    swag = DistributedSWAG(w.make_collector(0), w.optimizer)
    with pytest.raises(ValueError, match="2-process run but this run has 1 processes"):
        swag.resume(launched / "two-rank-ckpt", *args, **kwargs)
    assert swag.num_steps == 0


def test_multiswag_runs_are_independent_trajectories(launched):
    refs = [w.reference(100 + run) for run in (0, 1)]
    guides = [_load(launched / f"run{run}.pt", refs[run].model) for run in (0, 1)]
    for got, ref in zip(guides, refs):
        _assert_guides_close(got, ref, exact=True)  # one rank per run: nothing is reduced
    assert (guides[0].loc - guides[1].loc).abs().max() > 0.1


def test_multiswag_datatree_has_one_chain_per_rank(launched):
    result = json.loads((launched / "multiswag.json").read_text())
    assert result["num_guides"] == 2
    if "missing" in result:
        pytest.skip(f"MultiSWAG mixture / DataTree converter not available: {result['missing']}")
    assert result["posterior_sizes"]["chain"] == 2
    assert result["chain_mean_gap"] > 0.1  # each chain is drawn from its own run


def test_crashed_rank_restarted_from_checkpoint_gives_same_moments(launched):
    info = json.loads((launched / "crash.json").read_text())
    assert info == {"attempt": 1, "resumed": True, "first_step": 16}
    ref = w.reference(0)
    resumed = _load(launched / "guide-crash.pt", ref.model)
    _assert_guides_close(resumed, _load(launched / "guide-shardTrue.pt", ref.model), exact=True)


def test_example_smoke_under_torchrun():
    cmd = [*LAUNCH, str(ROOT / "examples" / "distributed.py"), "--smoke"]
    proc = _run(cmd, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "world size 2" in proc.stdout and "test RMSE" in proc.stdout


# ----------------------------------------------------------- one process, no process group
def test_single_process_equals_pyro_svi_exactly():
    ref = w.reference(0)
    x, y = w.make_data()
    swag = DistributedSWAG(w.make_collector(0), w.optimizer)
    assert (swag.rank, swag.world_size, default_backend("cpu")) == (0, 1, "gloo")
    w.train(swag, 0, 0, 1)
    _assert_guides_close(swag.swag_guide(), ref, exact=True)
    assert gather_runs(swag, split_runs(1))[0].loc.equal(ref.loc)


def test_a_models_own_parameter_is_trained_as_by_pyro_svi():
    x, y = w.make_data()

    def run(distributed):
        pyro.clear_param_store()
        torch.manual_seed(0)
        collector = SWAGCollector(w.param_model, rank=2)
        if distributed:
            swag = DistributedSWAG(collector, w.optimizer)
            step = swag.step
        else:
            sgd = pyro.optim.SGD({"lr": w.LR, "momentum": w.MOMENTUM})
            step = SVI(w.param_model, collector, sgd, Trace_ELBO()).step
        for t in range(w.STEPS):
            idx = w.batch(t, 0)
            step(x[idx], y[idx], num_data=w.N)
        return pyro.param("sigma").detach().clone(), collector.loc.detach().clone()

    ref, got = run(False), run(True)
    assert float(ref[0]) < 0.9  # sigma was trained (it stayed at 1 before)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_checkpoint_resume_single_process(tmp_path):
    x, y = w.make_data()
    args, kwargs = w.microbatch(0, 0, 0, 1, x, y)
    swag = DistributedSWAG(w.make_collector(0), w.optimizer)
    assert not swag.resume(tmp_path, *args, **kwargs)
    w.train(swag, 0, 0, 1, on_step=lambda t: t == 14 and swag.save(tmp_path))
    whole = swag.swag_guide()
    again = DistributedSWAG(w.make_collector(0), w.optimizer)
    assert again.resume(tmp_path, *args, **kwargs) and again.num_steps == 15
    w.train(again, 0, 0, 1, first=15)
    _assert_guides_close(again.swag_guide(), whole, exact=True)


def test_checkpoint_of_another_mode_is_refused(tmp_path):
    x, y = w.make_data()
    args, kwargs = w.microbatch(0, 0, 0, 1, x, y)
    swag = DistributedSWAG(w.make_collector(0), w.optimizer, shard=True)
    swag.step(*args, **kwargs)
    state = swag.state_dict()
    other = DistributedSWAG(w.make_collector(0), w.optimizer, shard=False)
    other.setup(*args, **kwargs)
    with pytest.raises(ValueError, match="shard"):
        other.load_state_dict(state)
    state["meta"]["layout"] = [("other", (3,))]
    with pytest.raises(ValueError, match="latent layout"):
        swag.load_state_dict(state)


def test_a_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    x, y = w.make_data()
    args, kwargs = w.microbatch(0, 0, 0, 1, x, y)
    swag = DistributedSWAG(w.make_collector(0), w.optimizer)
    w.train(swag, 0, 0, 1)
    state = swag.state_dict()
    for rank, dtype, error, match in (
        (3, torch.float32, ValueError, "rank=5 into a collector of rank=3"),
        (w.RANK, torch.float64, TypeError, "dtype=torch.float32 but the snapshots have "
                                           "dtype=torch.float64"),
    ):
        other = DistributedSWAG(w.make_collector(0, rank=rank, dtype=dtype), w.optimizer)
        other.setup(*(a.to(dtype) for a in args), **kwargs)
        before = other.collector.loc.detach().clone()
        with pytest.raises(error, match=match):
            other.load_state_dict(state)
        assert other.collector.loc.equal(before) and other.num_snapshots == 0
        assert not other.optimizer.state  # no momentum buffers loaded


def test_bad_dst_is_refused_before_any_communication():
    swag = DistributedSWAG(w.make_collector(0), w.optimizer)
    w.train(swag, 0, 0, 1)
    for dst in (1, -1, True, "0"):
        with pytest.raises(ValueError, match=f"dst must be None .* got dst={dst!r}"):
            swag.swag_guide(dst=dst)
    with pytest.raises(ValueError, match="got dst=2"):
        swag.gather_moments(dst=2)


def test_bad_arguments():
    collector = w.make_collector(0)
    with pytest.raises(TypeError, match="collector must be"):
        DistributedSWAG(object(), w.optimizer)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a factory"):
        DistributedSWAG(collector, opt)
    with pytest.raises(ValueError, match="num_runs must be"):
        split_runs(0)
    with pytest.raises(ValueError, match="does not divide"):
        split_runs(2)
    with pytest.raises(RuntimeError, match="not initialised"):
        DistributedSWAG(collector, w.optimizer, group=object())
    swag = DistributedSWAG(collector, functools.partial(torch.optim.SGD, lr=1e-3))
    with pytest.raises(RuntimeError, match="state_dict"):
        swag.state_dict()
    x, y = w.make_data()
    swag.step(x[:8], y[:8], num_data=w.N)
    with pytest.raises(RuntimeError, match="collect more snapshots"):
        swag.swag_guide()
    with torch.no_grad():
        swag.collector.loc[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        swag.collect()
    assert swag.num_snapshots == 0
    pyro.clear_param_store()
