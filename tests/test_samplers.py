"""Step 5: DDPM and DDIM against the paper's formulas, driven by stand-in eps-models."""
import numpy as np
import pytest
import torch

import ddpm_mnist as dm
from test_schedule import numpy_schedule

REF = numpy_schedule()


def stand_in(x, t):
    """A smooth, t-dependent fake eps-model; the samplers must accept any callable."""
    return 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1).sin()


def alg2_step(x_t, eps, t):
    """DDPM Alg. 2, line 4, written from the paper with numpy: mean and variance of
    x_{t-1} given x_t, with sigma_t^2 = beta_tilde_t (index t is the paper's t+1)."""
    a, ab, b = REF["alphas"][t], REF["alphas_cumprod"][t], REF["betas"][t]
    ab_prev = REF["alphas_cumprod_prev"][t]
    mean = (x_t - b / np.sqrt(1 - ab) * eps) / np.sqrt(a)
    var = b * (1 - ab_prev) / (1 - ab)
    return mean, var


@pytest.mark.parametrize("t", [1, 10, 300, 999])
def test_ddim_eta1_one_step_equals_ddpm_ancestral_step(t):
    s = dm.NoiseSchedule()
    g = torch.Generator().manual_seed(t)
    x_t = torch.randn(4, 1, 5, 5, generator=g)
    eps = torch.randn(4, 1, 5, 5, generator=g)
    want_mean, want_var = alg2_step(x_t.double().numpy(), eps.double().numpy(), t)
    tb, tprev = torch.full((4,), t), torch.full((4,), t - 1)
    mean, sigma, _ = dm.ddim_step(s, x_t, tb, tprev, eps, eta=1.0, clip=False)
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-4, atol=2e-5)
    # DDIM's sigma^2 holds 1 - abar_t / abar_{t-1} = beta_t ~ 1e-4 at small t, computed in
    # float32 by cancellation: 1e-3 relative (a noise std off by ~1e-9) is float32's limit.
    np.testing.assert_allclose((sigma ** 2).flatten().numpy(), want_var, rtol=2e-3)
    mean2, std2, _ = dm.ddpm_step(s, x_t, tb, eps, clip=False)
    np.testing.assert_allclose(mean2.numpy(), want_mean, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose((std2 ** 2).flatten().numpy(), want_var, rtol=1e-4)


def test_with_clipping_ddim_eta1_still_equals_ddpm_at_every_t():
    s = dm.NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x_t = 3 * torch.randn(1000, 1, 3, 3, generator=g)   # wild, so the clip is active
    eps = torch.randn(1000, 1, 3, 3, generator=g)
    t = torch.arange(1000)
    m1, s1, x0_1 = dm.ddpm_step(s, x_t, t, eps, clip=True)
    m2, s2, x0_2 = dm.ddim_step(s, x_t, t, t - 1, eps, eta=1.0, clip=True)
    assert (x0_1.abs() <= 1).all() and (x0_1.abs() == 1).any()
    # float32 throughout, with |x_t| up to 12: equal to about 1e-4 relative
    torch.testing.assert_close(m1, m2, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s1.flatten(), s2.flatten(), rtol=2e-3, atol=1e-7)


def test_full_ddim_eta1_over_all_T_steps_matches_ddpm_sampler():
    s = dm.NoiseSchedule()
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    a = dm.ddpm_sample(stand_in, s, x_T, generator=torch.Generator().manual_seed(5))
    b = dm.ddim_sample(stand_in, s, x_T, steps=1000, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_ddim_timesteps_start_at_the_last_index_and_are_uniform():
    ts = dm.ddim_timesteps(1000, 50)
    assert ts[0] == 999 and len(ts) == 50 and ts[-1] == 19
    assert set(np.diff(ts)) == {-20}
    assert dm.ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert dm.ddim_timesteps(1000, 1) == [999]
    for steps in (3, 7, 333):
        ts = dm.ddim_timesteps(1000, steps)
        assert ts[0] == 999 and len(set(ts)) == steps and all(a > b >= 0 for a, b in zip(ts, ts[1:]))


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    s = dm.NoiseSchedule()
    x_T = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    a = dm.ddim_sample(stand_in, s, x_T, steps=20, generator=torch.Generator().manual_seed(1))
    b = dm.ddim_sample(stand_in, s, x_T, steps=20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = dm.ddim_sample(stand_in, s, x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(1))
    d = dm.ddim_sample(stand_in, s, x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(c, d)


def test_samples_land_in_minus1_1_and_clipping_can_be_turned_off():
    s = dm.NoiseSchedule()
    wild = lambda x, t: -5 * torch.ones_like(x)       # predicts x_0 far outside the data range
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for out in (dm.ddim_sample(wild, s, x_T, steps=10), dm.ddpm_sample(wild, s, x_T)):
        assert out.min() >= -1 and out.max() <= 1
    assert dm.ddim_sample(wild, s, x_T, steps=10, clip_x0=False).abs().max() > 1


def test_a_perfect_eps_model_recovers_x0_in_one_ddim_step():
    """If eps_theta returns the true noise, DDIM's first jump predicts x_0 exactly."""
    s = dm.NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    x_T = s.q_sample(x0, torch.full((2,), 999), noise)
    out = dm.ddim_sample(lambda x, t: noise, s, x_T, steps=1)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
