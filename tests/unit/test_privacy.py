"""Client-level DP (phases.privacy, federation.privacy, Server's Gaussian on a group's mean): exact clipping, the
noise's variance, the accountant against dp-accounting itself, and the methods that refuse."""
import math
from types import SimpleNamespace

import dp_accounting
import pytest
import torch

from atlasfl.federation.server import Server
from atlasfl.phases.privacy import (
    clip_update,
    count_noise,
    epsilon,
    next_clip,
    privatise_upload,
    update_noise,
    update_norm,
)
from tests.conftest import tiny_config


def _states():
    start = {"lora::m::A": torch.zeros(2, 3), "lora::m::B": torch.ones(3, 2), "head::weight": torch.zeros(2, 4)}
    upload = {k: v + torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape) for k, v in start.items()}
    return upload, start


def test_clip_scales_the_whole_update_to_norm_c():
    upload, start = _states()
    norm = update_norm(upload, start)
    expected = math.sqrt(sum(float(torch.arange(v.numel(), dtype=torch.float64).square().sum())
                             for v in start.values()))
    assert norm == pytest.approx(expected, rel=1e-12)
    clipped = clip_update(upload, start, 2.0)
    assert update_norm(clipped, start) == pytest.approx(2.0, rel=1e-6)
    for k in upload:  # the direction is kept: every tensor scaled by the same factor
        assert torch.allclose(clipped[k] - start[k], (upload[k] - start[k]) * (2.0 / norm), atol=1e-6)
    assert clip_update(upload, start, norm * 2) is upload  # inside the ball: untouched


def test_local_noise_has_variance_z_c_squared():
    start = {"lora::m::A": torch.zeros(200, 200)}
    upload = {"lora::m::A": torch.zeros(200, 200)}
    noised, within = privatise_upload(upload, start, clip=0.5, noise=3.0, local=True,
                                      generator=torch.Generator().manual_seed(0))
    noised = noised["lora::m::A"]
    assert within  # a zero update is within any clip
    assert float(noised.double().var()) == pytest.approx((3.0 * 0.5) ** 2, rel=0.05)
    assert float(noised.double().mean()) == pytest.approx(0.0, abs=0.02)


def test_central_noise_std_is_z_c_over_the_members_of_each_key():
    """Adapters: m = the group; a head: the members with that head shape (its own sum of clipped updates)."""
    states = [{"lora::m::A": torch.zeros(1), "head::weight": torch.zeros(2, 4)} for _ in range(3)]
    states.append({"lora::m::A": torch.zeros(1), "head::weight": torch.zeros(3, 4)})
    fake = SimpleNamespace(cfg=SimpleNamespace(seed=0))
    noised = Server._private_step(fake, None, states, 1, "0,1,2,3", 2.0 * 0.5)
    adapter = noised("lora::m::A", torch.zeros(300, 300)).double()
    head = noised("head::weight@2x4", torch.zeros(300, 300)).double()
    lone = noised("head::weight@3x4", torch.zeros(300, 300)).double()
    assert float(adapter.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.03)
    assert float(head.std()) == pytest.approx(2.0 * 0.5 / 3, rel=0.03)
    assert float(lone.std()) == pytest.approx(2.0 * 0.5 / 1, rel=0.03)
    again = Server._private_step(fake, None, states, 1, "0,1,2,3", 2.0 * 0.5)("lora::m::A", torch.zeros(300, 300))
    assert torch.equal(again.double(), adapter)  # seeded by run seed, round and group: a rerun draws the same


def test_the_within_clip_bit_is_the_update_norm_against_the_clip():
    upload, start = _states()
    norm = update_norm(upload, start)
    assert privatise_upload(upload, start, clip=norm, noise=0.0, local=False, generator=None)[1]
    assert not privatise_upload(upload, start, clip=norm * 0.99, noise=0.0, local=False, generator=None)[1]


def test_the_clip_moves_geometrically_toward_the_target_quantile():
    """Andrew et al. 2021: C·exp(-η(b̄ - γ)), b̄ = (Σb + N(0, σ_b²))/m: here the draw is read back from the same seed."""
    draw = float(torch.randn((), generator=torch.Generator().manual_seed(3), dtype=torch.float64)) * 0.7
    new, fraction = next_clip(2.0, 3, 4, target=0.5, lr=0.2, count_std=0.7, generator=torch.Generator().manual_seed(3))
    assert fraction == pytest.approx((3 + draw) / 4, rel=1e-12)
    assert new == pytest.approx(2.0 * math.exp(-0.2 * ((3 + draw) / 4 - 0.5)), rel=1e-12)
    # without count noise: all within -> the clip shrinks by exp(-η/2); none within -> it grows by exp(η/2)
    quiet = dict(target=0.5, lr=0.2, count_std=0.0, generator=torch.Generator().manual_seed(0))
    assert next_clip(1.0, 4, 4, **quiet)[0] == pytest.approx(math.exp(-0.1), rel=1e-12)
    assert next_clip(1.0, 0, 4, **quiet)[0] == pytest.approx(math.exp(0.1), rel=1e-12)


def test_the_count_leaves_the_update_what_remains_of_z():
    """(z_Δ⁻² + (2σ_b)⁻²)^(-1/2) = z: the two releases together are one Gaussian of multiplier z."""
    z_update = update_noise(1.0, 2.0)
    assert z_update == pytest.approx((1.0 - 1 / 16) ** -0.5, rel=1e-12)
    assert (z_update ** -2 + 4.0 ** -2) ** -0.5 == pytest.approx(1.0, rel=1e-12)
    assert update_noise(0.0, 0.1) == 0.0
    with pytest.raises(ValueError, match="needs σ_b > z/2"):
        update_noise(1.0, 0.5)
    assert count_noise(100, 1.0) == 5.0  # the paper's m/20 where groups are large
    small = count_noise(3, 1.0)  # raised in a small group: the count spends a tenth of the budget
    assert small == pytest.approx(math.sqrt(10) / 2) and update_noise(1.0, small) == pytest.approx(0.9 ** -0.5)


def _adaptive_server(tmp_path, **kw):
    cfg = tiny_config(tmp_path, method="standard_fl", dp_clip=1.0, dp_noise=1.0, dp_target_quantile=0.5, **kw)
    server = SimpleNamespace(cfg=cfg, clips=dict.fromkeys(range(4), 1.0), round_clips={})
    for name in ("_adapt_clip", "_group_clip", "_count_noise", "_update_noise"):
        setattr(server, name, getattr(Server, name).__get__(server))
    return server


def test_a_groups_clip_is_its_members_largest_and_every_member_takes_the_new_one(tmp_path):
    server = _adaptive_server(tmp_path, dp_count_noise=5.0)
    server.clips[1] = 2.0  # a member that came from another group
    server._adapt_clip([0, 1, 2, 3], [0, 1, 2], {0: True, 1: True, 2: False}, round_idx=1, name="0,1,2,3")
    record = server.round_clips["0,1,2,3"]
    assert record["clip"] == 2.0 and set(server.clips.values()) == {record["next_clip"]}  # client 3 (absent) too
    assert record["next_clip"] == pytest.approx(2.0 * math.exp(-0.2 * (record["within_fraction"] - 0.5)))
    assert record["update_noise_multiplier"] == pytest.approx(update_noise(1.0, 5.0))


@pytest.mark.parametrize("z, q, steps", [(1.1, 1.0, 10), (0.8, 1.0, 3), (1.0, 0.1, 50)])
def test_epsilon_is_the_librarys(z, q, steps):
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    accountant.compose(event if q == 1 else dp_accounting.PoissonSampledDpEvent(q, event), steps)
    assert epsilon(z, [q] * steps, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_no_noise_is_infinite():
    assert epsilon(1.0, [1.0] * 2, 1e-5) < epsilon(1.0, [1.0] * 3, 1e-5)
    assert epsilon(0.0, [1.0], 1e-5) == math.inf
    assert epsilon(1.0, [], 1e-5) == 0.0


@pytest.mark.parametrize("method, why", [
    ("atlas", "forms no group average"), ("flora", "forms no group average"),
    ("flexlora", "averages ΔW"), ("atlas_no_laplacian", "averages ΔW"), ("hetlora", "own update's norm"),
    ("ifca", "single clients' states"), ("cfl", "individual updates"), ("local_only", "shares nothing"),
])
def test_methods_dp_cannot_cover_refuse_in_one_line(tmp_path, method, why):
    with pytest.raises(Exception) as info:
        tiny_config(tmp_path, method=method, dp_clip=1.0)
    assert why in str(info.value) and f"--dp-clip: {method}" in str(info.value)


@pytest.mark.parametrize("method", ["standard_fl", "fedavg_cluster", "fedprox", "ffa_lora", "fedsa_lora", "ditto",
                                    "fedrep"])
def test_averaging_methods_take_dp(tmp_path, method):
    assert tiny_config(tmp_path, method=method, dp_clip=1.0, dp_noise=1.0).dp_clip == 1.0


def test_dp_settings_need_a_clip(tmp_path):
    with pytest.raises(Exception, match="--dp-noise needs --dp-clip"):
        tiny_config(tmp_path, method="standard_fl", dp_noise=2.0)


@pytest.mark.parametrize("settings, message", [
    (dict(dp_target_quantile=0.5), "--dp-target-quantile needs --dp-clip"),
    (dict(dp_clip=1.0, dp_clip_lr=0.5), "--dp-clip-lr needs --dp-target-quantile"),
    (dict(dp_clip=1.0, dp_target_quantile=0.5, dp_mode="local"), "needs --dp-mode central"),
    (dict(dp_clip=math.inf, dp_target_quantile=0.5), "needs a finite --dp-clip"),
    (dict(dp_clip=1.0, dp_noise=2.0, dp_target_quantile=0.5, dp_count_noise=1.0), "must exceed z/2 = 1"),
])
def test_adaptive_clipping_settings_are_checked_in_one_line(tmp_path, settings, message):
    with pytest.raises(Exception, match=message):
        tiny_config(tmp_path, method="standard_fl", **settings)
