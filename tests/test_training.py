"""Step 4 and the fast path: the loss, EMA, data order and bf16 compute what they claim."""
import copy

import pytest
import torch

import ddpm_mnist as dm

TINY = (8, 8, 16, 16)


def test_tiny_model_overfits_a_few_fixed_images():
    torch.manual_seed(0)
    model = dm.UNet(TINY)
    s = dm.NoiseSchedule()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)).round() * 2 - 1
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss, _ = dm.diffusion_loss(model, s, dm.draw_batch(x0.repeat(4, 1, 1, 1), s.T, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert first > 0.5 and last < 0.6 * first, (first, last)


def test_loss_is_mse_between_true_and_predicted_noise():
    """Replay the same draws by hand: t uniform over 0..T-1, eps ~ N(0, I), Eq. 4, MSE."""
    s = dm.NoiseSchedule()
    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    model = lambda x, t: 0.5 * x
    loss, _ = dm.diffusion_loss(model, s, dm.draw_batch(x0, s.T, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    assert abs(loss.item() - ((0.5 * x_t - eps) ** 2).mean().item()) < 1e-5


def test_foreach_ema_equals_the_plain_formula():
    torch.manual_seed(0)
    model, ema = dm.UNet(TINY), dm.UNet(TINY)
    want = [0.99 * e + 0.01 * p for e, p in zip(ema.parameters(), model.parameters())]
    dm.ema_update(list(ema.parameters()), list(model.parameters()), 0.99)
    for w, e in zip(want, ema.parameters()):
        torch.testing.assert_close(e, w, rtol=0, atol=1e-7)


def test_ema_warmup():
    assert dm.ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert dm.ema_decay_at(90, 0.9999) == pytest.approx(0.91)
    assert dm.ema_decay_at(10 ** 7, 0.9999) == 0.9999
    assert all(dm.ema_decay_at(n, 0.9999) <= dm.ema_decay_at(n + 1, 0.9999) for n in range(0, 5000, 7))


def test_device_batches_cover_every_image_once_per_epoch():
    n, B = 1000, 64
    for epoch in range(3):
        b = dm.epoch_batches(n, B, seed=0, epoch=epoch)
        assert b.shape == (n // B, B)
        flat = b.flatten()
        assert len(flat.unique()) == len(flat) == n - n % B      # no repeats, only the tail dropped
        assert flat.min() >= 0 and flat.max() < n
    assert not torch.equal(dm.epoch_batches(n, B, 0, 0), dm.epoch_batches(n, B, 0, 1))
    assert torch.equal(dm.epoch_batches(n, B, 0, 1), dm.epoch_batches(n, B, 0, 1))
    # over many epochs every image is seen: the dropped tail differs each time
    seen = torch.cat([dm.epoch_batches(n, B, 0, e).flatten() for e in range(10)]).unique()
    assert len(seen) == n


def test_images_scale_to_minus1_1_and_back():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(1, 2, 2)[:, :28, :28]
    x = dm.to_model_range(u8)
    assert x.shape == (1, 1, 28, 28) and x.min() == -1 and x.max() == 1
    assert torch.equal(dm.to_uint8(x), u8)


def test_bf16_and_fp32_training_give_the_same_losses():
    """Five steps of Part I's loop from the same weights and draws: bf16 autocast loss within
    2% of fp32 at every step (bf16 keeps 8 bits of mantissa)."""
    cfg = dm.Config(channels=TINY, lr=1e-3, batch_size=32, epochs=5)
    data = (torch.rand(32, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    runs = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        p = dm.build(cfg, dm.UNet(TINY), dm.NoiseSchedule(), "cpu")
        p.eps_model = dm.Autocast(p.model, torch.device("cpu"), torch.bfloat16 if bf16 else None)
        runs[bf16] = []
        dm.train(cfg, data, p, on_step=lambda step, loss, t, err: runs[bf16].append(loss.item()))
    assert len(runs[False]) == 5
    for a, b in zip(runs[False], runs[True]):
        assert abs(a - b) < 0.02 * a, runs
    assert runs[False] != runs[True]          # bf16 really ran


def test_fused_adamw_follows_the_adamw_update_by_hand():
    """make_optimizer's fused AdamW against Loshchilov & Hutter's Alg. 2 written out in
    float64: theta <- theta (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), over 3 steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    cfg = dm.Config(lr=1e-2, weight_decay=0.1)
    opt = dm.make_optimizer(model, cfg, torch.device("cpu"))
    assert opt.param_groups[0]["fused"]
    theta = [p.detach().double().clone() for p in model.parameters()]
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for k in range(1, 4):
        grads = [torch.randn(p.shape, dtype=torch.float64) for p in theta]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.float()
        opt.step()
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** k), v[i] / (1 - b2 ** k)
            theta[i] = theta[i] * (1 - cfg.lr * cfg.weight_decay) - cfg.lr * m_hat / (v_hat.sqrt() + eps)
    for p, want in zip(model.parameters(), theta):
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-6)
