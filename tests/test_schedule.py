"""Step 1 and 2: the noise schedule against a separate numpy computation, and the
closed-form forward process against its stated mean and variance."""
import numpy as np
import torch

import ddpm_mnist as dm


def numpy_schedule(T=1000, b1=1e-4, bT=0.02):
    """The DDPM paper's definitions, written out independently in float64."""
    beta = np.linspace(b1, bT, T)
    alpha = 1 - beta
    abar = np.cumprod(alpha)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return dict(
        betas=beta, alphas=alpha, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
        sqrt_recip_alphas_cumprod=1 / np.sqrt(abar), sqrt_recipm1_alphas_cumprod=np.sqrt(1 / abar - 1),
        posterior_variance=beta * (1 - abar_prev) / (1 - abar),
        posterior_mean_coef1=np.sqrt(abar_prev) * beta / (1 - abar),
        posterior_mean_coef2=np.sqrt(alpha) * (1 - abar_prev) / (1 - abar),
    )


def test_buffers_match_numpy_reference():
    s = dm.NoiseSchedule()
    ref = numpy_schedule()
    buffers = dict(s.named_buffers())
    for name, want in ref.items():
        got = buffers[name]                       # registered by this exact name
        assert got.dtype == torch.float32 and got.shape == (1000,), name
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-12, err_msg=name)


def test_timestep_convention_index_0_is_paper_t_1():
    s = dm.NoiseSchedule()
    assert abs(s.betas[0].item() - 1e-4) < 1e-10 and abs(s.betas[-1].item() - 0.02) < 1e-9
    assert s.alphas_cumprod[0].item() == np.float32(1 - 1e-4)
    assert s.alphas_cumprod_prev[0].item() == 1.0     # alpha_bar_0: no noise
    assert s.posterior_variance[0].item() == 0.0      # x_0 given x_1 and x_0 is x_0
    # at the last index the signal is almost gone: sqrt(alpha_bar_T) ~ 0.0064
    assert 0.005 < s.sqrt_alphas_cumprod[-1].item() < 0.008


def test_buffers_follow_the_module_device_and_dtype():
    s = dm.NoiseSchedule().to(torch.float64)
    assert all(b.dtype == torch.float64 for b in s.buffers())
    assert len(list(s.buffers())) >= 11


def test_q_sample_mean_and_variance_at_several_t():
    """x_t | x_0 ~ N(sqrt(abar_t) x_0, (1 - abar_t) I) (Eq. 4), checked empirically."""
    s = dm.NoiseSchedule()
    ref = numpy_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((40000, 1, 2, 2), 0.7)
    for t in (0, 10, 250, 500, 999):
        tt = torch.full((len(x0),), t, dtype=torch.long)
        x_t = s.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        mean, var = x_t.mean().item(), x_t.var().item()
        want_mean, want_var = np.sqrt(ref["alphas_cumprod"][t]) * 0.7, 1 - ref["alphas_cumprod"][t]
        assert abs(mean - want_mean) < 4 * np.sqrt(want_var / x_t.numel()) + 1e-6, (t, mean, want_mean)
        assert abs(var - want_var) < 0.03 * want_var + 1e-7, (t, var, want_var)


def test_q_sample_uses_each_elements_own_t():
    s = dm.NoiseSchedule()
    x0 = torch.ones(2, 1, 3, 3)
    noise = torch.zeros_like(x0)
    x_t = s.q_sample(x0, torch.tensor([0, 999]), noise)
    ref = numpy_schedule()
    assert torch.allclose(x_t[0], torch.tensor(np.sqrt(ref["alphas_cumprod"][0])).float())
    assert torch.allclose(x_t[1], torch.tensor(np.sqrt(ref["alphas_cumprod"][999])).float())
