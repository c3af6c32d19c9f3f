"""The short-run levers and the cosine schedule, each against its formula written out
independently, and each off by default so the case study's recipe is unchanged."""
import math

import numpy as np
import pytest
import torch

import ddpm_mnist as dm
from PIL import Image

from conftest import TINY_ARGS
from test_samplers import stand_in
from test_schedule import numpy_schedule


# --- the cosine schedule (Nichol & Dhariwal 2021, Eq. 17) ---------------------------

def numpy_cosine_alpha_bar(T=1000, s=0.008):
    t = np.arange(T + 1) / T
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    return f / f[0]                                   # alpha_bar(0) = 1 .. alpha_bar(T)


def test_cosine_alpha_bar_follows_the_closed_form():
    s = dm.NoiseSchedule(make_betas=dm.cosine_betas)
    abar = numpy_cosine_alpha_bar()
    beta = np.minimum(1 - abar[1:] / abar[:-1], 0.999)
    want = np.cumprod(1 - beta)                       # what the clipped betas give
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), want, rtol=2e-6, atol=1e-12)
    # only the last few betas are clipped, so alpha_bar is the closed form until there
    np.testing.assert_allclose(s.alphas_cumprod[:990].numpy(), abar[1:991], rtol=2e-6)


def test_cosine_betas_are_capped_and_alpha_bar_falls_strictly():
    s = dm.NoiseSchedule(make_betas=dm.cosine_betas)
    assert s.betas.max().item() <= 0.999 + 1e-7 and s.betas.min().item() > 0
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    assert s.alphas_cumprod_prev[0] == 1.0 and s.posterior_variance[0] == 0.0
    # the cosine schedule keeps more signal in the middle: sqrt(alpha_bar) at t = 600
    lin = dm.NoiseSchedule()
    assert s.sqrt_alphas_cumprod[599] > 2 * lin.sqrt_alphas_cumprod[599]


def test_q_sample_moments_under_cosine():
    s = dm.NoiseSchedule(make_betas=dm.cosine_betas)
    abar = numpy_cosine_alpha_bar()[1:]
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((40000, 1, 2, 2), -0.4)
    for t in (0, 300, 700, 990):
        x_t = s.q_sample(x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=g))
        want_mean, want_var = np.sqrt(abar[t]) * -0.4, 1 - abar[t]
        assert abs(x_t.mean().item() - want_mean) < 4 * np.sqrt(want_var / x_t.numel()) + 1e-6, t
        assert abs(x_t.var().item() - want_var) < 0.03 * want_var + 1e-7, t


def test_ddim_eta1_over_all_steps_is_ddpm_under_cosine_too():
    s = dm.NoiseSchedule(make_betas=dm.cosine_betas)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    a = dm.ddpm_sample(stand_in, s, x_T, generator=torch.Generator().manual_seed(5))
    b = dm.ddim_sample(stand_in, s, x_T, steps=1000, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_linear_schedule_buffers_are_the_papers():
    """Bitwise: the linear betas are torch.linspace in float64, cast once."""
    s = dm.make_schedule(dm.RunConfig())
    want = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.equal(s.betas, want.float())
    assert torch.equal(s.alphas_cumprod, torch.cumprod(1 - want, 0).float())
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), numpy_schedule()["alphas_cumprod"], rtol=2e-6)


def test_a_cosine_checkpoint_samples_with_the_cosine_schedule(mnist_dir, tmp_path):
    run = tmp_path / "cos"
    dm.main(["train", *TINY_ARGS, "--grid-n", "0", "--epochs", "1", "--schedule", "cosine",
             "--data-dir", str(mnist_dir), "--run-dir", str(run)])
    ckpt = dm.load_checkpoint(run / "ckpt.pt")
    model, cfg = dm.model_from_checkpoint(ckpt)
    assert cfg.schedule == "cosine"
    s = dm.make_schedule(cfg)
    np.testing.assert_allclose(s.alphas_cumprod[:990].numpy(), numpy_cosine_alpha_bar()[1:991], rtol=2e-6)
    out = tmp_path / "s.npz"
    dm.main(["sample", "--ckpt", str(run / "ckpt.pt"), "--steps", "3", "--n", "2", "--format", "npz",
             "--out", str(out), "--device", "cpu"])
    # the same first step by hand, with the cosine alpha_bar: DDIM from index 999 to 666
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with np.load(out) as z:
        assert z["images"].shape == (2, 28, 28)
    step1 = dm.ddim_step(s, x_T, torch.full((2,), 999), torch.full((2,), 666),
                         model(x_T, torch.full((2,), 999)))[0]
    lin = dm.NoiseSchedule()
    step1_lin = dm.ddim_step(lin, x_T, torch.full((2,), 999), torch.full((2,), 666),
                             model(x_T, torch.full((2,), 999)))[0]
    assert not torch.allclose(step1, step1_lin)      # the schedule really changes sampling


# --- the learning-rate schedule -------------------------------------------------------

def test_lr_warmup_and_cosine_decay_by_hand():
    cfg = dm.RunConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=100)
    total = 1100
    assert dm.lr_at(0, cfg, total) == pytest.approx(1e-5)          # 1/100 of the way up
    assert dm.lr_at(99, cfg, total) == pytest.approx(1e-3)         # warm-up ends at the full lr
    assert dm.lr_at(600, cfg, total) == pytest.approx(0.5e-3)      # half-way down the cosine
    assert dm.lr_at(100 + 250, cfg, total) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert dm.lr_at(1100, cfg, total) == pytest.approx(0.0, abs=1e-12)
    lrs = [dm.lr_at(k, cfg, total) for k in range(100, 1100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    const = dm.RunConfig(lr=2e-4)
    assert {dm.lr_at(k, const, total) for k in (0, 50, 600, 1099)} == {2e-4}


def test_the_case_studys_recipe_keeps_its_levers_off():
    cfg = dm.PRESETS["paper"]
    assert (cfg.lr_schedule, cfg.warmup_steps, cfg.min_snr_gamma, cfg.schedule) == ("constant", 0, 0.0, "linear")


# --- min-SNR-gamma weighting (Hang et al. 2023) ----------------------------------------

def test_min_snr_weight_against_numpy():
    s = dm.NoiseSchedule()
    abar = numpy_schedule()["alphas_cumprod"]
    t = torch.tensor([0, 50, 200, 400, 999])
    snr = abar[t.numpy()] / (1 - abar[t.numpy()])
    want = np.minimum(snr, 5.0) / snr
    np.testing.assert_allclose(dm.min_snr_weight(s, t, 5.0).numpy(), want, rtol=1e-4)
    assert want[0] < 1e-3 and want[-1] == 1.0          # clean steps turned down, noisy ones kept


def test_weighted_loss_by_hand_and_plain_mse_when_off():
    s = dm.NoiseSchedule()
    x0 = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = lambda x, t: 0.5 * x
    b = dm.draw_batch(x0, s.T, torch.Generator().manual_seed(3))
    plain = dm.diffusion_loss(model, s, b)[0]
    assert dm.training_loss(dm.RunConfig(min_snr_gamma=0.0)) is dm.diffusion_loss     # off: the plain loss
    weighted = dm.min_snr_loss(5.0)(model, s, b)[0]
    g = torch.Generator().manual_seed(3)                # replay the draws by hand
    t = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = numpy_schedule()["alphas_cumprod"][t.numpy()]
    x_t = np.sqrt(abar)[:, None, None, None] * x0.double().numpy() + np.sqrt(1 - abar)[:, None, None, None] * eps.double().numpy()
    per_image = ((0.5 * x_t - eps.double().numpy()) ** 2).mean(axis=(1, 2, 3))
    snr = abar / (1 - abar)
    assert weighted.item() == pytest.approx((np.minimum(snr, 5) / snr * per_image).mean(), rel=1e-4)
    assert plain.item() == pytest.approx(per_image.mean(), rel=1e-4)


# --- exact resume with every lever on ---------------------------------------------------

def test_a_run_with_the_levers_resumes_bitwise(mnist_dir, tmp_path):
    args = [*TINY_ARGS, "--grid-n", "0", "--epochs", "3", "--lr-schedule", "cosine", "--warmup-steps", "5",
            "--min-snr-gamma", "5", "--schedule", "cosine", "--data-dir", str(mnist_dir)]
    dm.main(["train", *args, "--run-dir", str(tmp_path / "ref")])
    dm.main(["train", *args, "--run-dir", str(tmp_path / "cut"), "--max-steps", "11"])
    dm.main(["train", "--run-dir", str(tmp_path / "cut"), "--resume", "--data-dir", str(mnist_dir), "--device", "cpu"])
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("ref", "cut"))
    assert a["step"] == b["step"] == 24
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["opt"]["param_groups"][0]["lr"] == b["opt"]["param_groups"][0]["lr"]
    # and the log: every column but the seconds, the loss by noise level included
    strip = lambda r: [line.split(",")[:3] + line.split(",")[4:] for line in (tmp_path / r / "loss.csv").read_text().splitlines()]
    assert strip("ref") == strip("cut")


# --- the schedule made visible, and the loss by noise level ------------------------------

def test_the_forward_strip_under_the_cosine_schedule_keeps_more_digit(mnist_dir, tmp_path):
    dm.main(["forward", "--data-dir", str(mnist_dir), "--n", "1", "--out", str(tmp_path / "lin.png")])
    dm.main(["forward", "--data-dir", str(mnist_dir), "--n", "1", "--schedule", "cosine",
             "--out", str(tmp_path / "cos.png")])
    lin, cos = (np.array(Image.open(tmp_path / f)) for f in ("lin.png", "cos.png"))
    cell = 28 * 3 + 2
    col = lambda a, c: a[2:2 + 84, 2 + c * cell: 2 + c * cell + 84].astype(float)
    assert np.array_equal(col(lin, 7), col(lin, 7)) and not np.array_equal(col(lin, 4), col(cos, 4))
    # at t = 400 the cosine schedule leaves more of the digit: closer to the clean column
    assert np.abs(col(cos, 4) - col(cos, 0)).mean() < np.abs(col(lin, 4) - col(lin, 0)).mean()


def test_loss_csv_has_the_loss_by_noise_level(tiny_run):
    rows = (tiny_run / "loss.csv").read_text().splitlines()
    head = rows[0].split(",")
    assert head[4:] == ["loss_t1-250", "loss_t251-500", "loss_t501-750", "loss_t751-1000"]
    for row in rows[1:]:
        v = [float(x) for x in row.split(",")]
        mean, by_t = v[2], v[4:]
        assert all(x > 0 for x in by_t)
        assert min(by_t) <= mean <= max(by_t)           # the epoch mean is a mix of the four
