"""Running SWAG moments against direct computations on the stacked snapshots."""

import pytest
import torch

from pyro_swag import SWAGMoments


def _direct(snapshots, rank):
    """Mean, population variance and last deviations theta_i - mean(theta_1..theta_i)."""
    stacked = torch.stack(snapshots)
    running = torch.cumsum(stacked, 0) / torch.arange(1, len(snapshots) + 1)[:, None]
    devs = (stacked - running)[1:]  # the first deviation is zero and not stored
    return stacked.mean(0), stacked.var(0, unbiased=False), devs[-rank:]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 50])
def test_moments_match_stacked_snapshots(n):
    rank = 5
    torch.manual_seed(n)
    snaps = [torch.randn(7, dtype=torch.float64) * 3 + 1 for _ in range(n)]
    m = SWAGMoments(rank=rank, min_var=0.0)
    for s in snaps:
        m.update(s)
    mean, var, devs = _direct(snaps, rank)
    assert m.count == n
    assert m.num_deviations == min(rank, n - 1) == len(devs)
    torch.testing.assert_close(m.mean, mean)
    torch.testing.assert_close(m.variance(), var)
    torch.testing.assert_close(m.deviation_matrix(), devs)


def test_variance_clamped_below():
    m = SWAGMoments(rank=2, min_var=1e-6)
    for _ in range(3):
        m.update(torch.ones(4))
    assert torch.equal(m.variance(), torch.full((4,), 1e-6))


def test_float32_mean_after_10000_snapshots():
    torch.manual_seed(0)
    snaps = torch.randn(10_000, 256) * 0.5 + 3.0
    m = SWAGMoments(rank=20)
    for s in snaps:
        m.update(s)
    exact = snaps.double().mean(0)
    rel = ((m.mean.double() - exact).abs() / exact.abs()).max()
    assert rel < 1e-5


def test_float32_variance_when_spread_is_tiny_relative_to_mean():
    torch.manual_seed(1)
    # sd is 1e-4 of the mean: mean(theta^2) - mu^2 has no digits left in float32.
    snaps64 = 1000.0 + 0.1 * torch.randn(2000, 64, dtype=torch.float64)
    snaps = snaps64.float()
    m = SWAGMoments(rank=5)
    for s in snaps:
        m.update(s)
    exact = snaps.double().var(0, unbiased=False)
    rel = ((m.variance().double() - exact).abs() / exact).max()
    assert rel < 0.01
    textbook = (snaps**2).mean(0) - snaps.mean(0) ** 2
    assert ((textbook.double() - exact).abs() / exact).max() > 0.01  # the pitfall is real


def test_bfloat16_deviation_buffer_and_offload():
    torch.manual_seed(2)
    snaps = [torch.randn(16) for _ in range(8)]
    m = SWAGMoments(rank=4, deviation_dtype=torch.bfloat16, device="cpu")
    for s in snaps:
        m.update(s)
    _, _, devs = _direct([s.double() for s in snaps], 4)
    assert m.deviations.dtype == torch.bfloat16
    torch.testing.assert_close(m.deviation_matrix().double(), devs, atol=2e-2, rtol=2e-2)


def test_snapshot_is_o_of_p_in_place():
    m = SWAGMoments(rank=3)
    m.update(torch.zeros(10))
    buffers = [m.mean.data_ptr(), m.m2.data_ptr(), m.deviations.data_ptr()]
    for _i in range(10):
        m.update(torch.randn(10))
    assert [m.mean.data_ptr(), m.m2.data_ptr(), m.deviations.data_ptr()] == buffers


def test_state_dict_round_trip_and_continue(tmp_path):
    torch.manual_seed(3)
    snaps = [torch.randn(9) for _ in range(12)]
    a = SWAGMoments(rank=4)
    for s in snaps[:7]:
        a.update(s)
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = SWAGMoments(rank=4)
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for s in snaps[7:]:
        a.update(s)
        b.update(s)
    assert a.count == b.count == 12
    for name in ("mean", "m2", "deviations"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.deviation_matrix(), b.deviation_matrix())


def test_errors_leave_state_untouched():
    m = SWAGMoments(rank=2)
    m.update(torch.randn(5))
    m.update(torch.randn(5))
    before = {k: v.clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="NaN or Inf"):
        m.update(torch.tensor([0.0, float("nan"), 0, 0, 0]))
    with pytest.raises(ValueError, match="has 4 entries"):
        m.update(torch.randn(4))
    with pytest.raises(TypeError, match="dtype=torch.float64"):
        m.update(torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="flat vector"):
        m.update(torch.randn(5, 1))
    assert m.count == 2
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v)


def test_bad_construction_and_loading():
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got rank=0"):
        SWAGMoments(rank=0)
    with pytest.raises(RuntimeError, match="0 snapshot"):
        SWAGMoments(rank=2).variance()
    a = SWAGMoments(rank=2)
    a.update(torch.randn(5))
    b = SWAGMoments(rank=2)
    b.update(torch.randn(6))
    with pytest.raises(ValueError, match="another model"):
        b.load_state_dict(a.state_dict())
    rank3 = SWAGMoments(rank=3)
    rank3.update(torch.randn(5))
    with pytest.raises(ValueError, match="construct it with rank=3"):
        SWAGMoments(rank=2).load_state_dict(rank3.state_dict())
