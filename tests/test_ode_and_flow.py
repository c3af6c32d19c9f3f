"""II.6 and II.7: DPM-Solver++(2M) against the algorithm written out in numpy, flow matching
against closed forms, and a tiny flow run through the command line."""
import argparse

import numpy as np
import pytest
import torch

import ddpm_mnist as dm
from conftest import TINY_ARGS
from test_schedule import numpy_schedule

REF = numpy_schedule()


def stand_in_np(x, t):
    """A smooth, t-dependent fake eps-model in numpy; stand_in below is the same in torch."""
    return 0.3 * x + 0.01 * np.sin(t)


def stand_in(x, t):
    return 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1).sin()


def dpm_solver_pp_2m(x_T, ts, clip):
    """Lu et al. 2022, Alg. 2 (DPM-Solver++(2M)), in float64 numpy, on the indices ts and then
    to the clean image, which takes the last data prediction."""
    alpha = np.sqrt(REF["alphas_cumprod"])
    sigma = np.sqrt(1 - REF["alphas_cumprod"])
    lam = np.log(alpha / sigma)
    x, previous = x_T, None
    for i, t in enumerate(ts):
        x0 = (x - sigma[t] * stand_in_np(x, t)) / alpha[t]
        if clip:
            x0 = np.clip(x0, -1, 1)
        if i == len(ts) - 1:
            return x0
        s = ts[i + 1]
        h = lam[s] - lam[t]
        if previous is None:
            D = x0
        else:
            t_before, x0_before = previous
            r = (lam[t] - lam[t_before]) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_before
        x = sigma[s] / sigma[t] * x - alpha[s] * (np.exp(-h) - 1) * D
        previous = (t, x0)


@pytest.mark.parametrize("steps,clip", [(1, True), (2, False), (10, False), (20, True), (50, False)])
def test_dpm_solver_follows_algorithm_2_in_float64(steps, clip):
    s = dm.NoiseSchedule()
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(steps))
    want = dpm_solver_pp_2m(x_T.double().numpy(), dm.ddim_timesteps(1000, steps), clip)
    got = dm.dpm_solver_sample(stand_in, s, x_T, steps=steps, clip_x0=clip)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_dpm_solver_step_is_the_formula_and_its_first_order_is_ddims_step():
    s = dm.NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x_t, x0, x0_last = (torch.randn(2, 1, 3, 3, generator=g) for _ in range(3))
    t, t_next, t_last = 500, 450, 550
    ab = REF["alphas_cumprod"]
    lam = lambda i: 0.5 * np.log(ab[i] / (1 - ab[i]))
    h = lam(t_next) - lam(t)
    r = (lam(t) - lam(t_last)) / h
    D = (1 + 1 / (2 * r)) * x0.double().numpy() - 1 / (2 * r) * x0_last.double().numpy()
    want = np.sqrt((1 - ab[t_next]) / (1 - ab[t])) * x_t.double().numpy() - \
        np.sqrt(ab[t_next]) * np.expm1(-h) * D
    got = dm.dpm_solver_step(s, x_t, t, t_next, x0, t_last, x0_last)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    # first order: DDIM's eta = 0 step from the same x_0 (its eps re-derived from x_t and x_0)
    x_tn, x0n = x_t.double().numpy(), x0.double().numpy()
    eps = (x_tn - np.sqrt(ab[t]) * x0n) / np.sqrt(1 - ab[t])
    ddim = np.sqrt(ab[t_next]) * x0n + np.sqrt(1 - ab[t_next]) * eps
    np.testing.assert_allclose(dm.dpm_solver_step(s, x_t, t, t_next, x0).numpy(), ddim,
                               rtol=1e-4, atol=1e-5)
    mean, _, _ = dm.ddim_step(s, x_t, torch.full((2,), t), torch.full((2,), t_next), torch.from_numpy(
        eps).float(), clip=False)
    torch.testing.assert_close(dm.dpm_solver_step(s, x_t, t, t_next, x0), mean, rtol=1e-4, atol=1e-5)
    assert torch.equal(dm.dpm_solver_step(s, x_t, t, -1, x0, t_last, x0_last), x0)   # the last


@pytest.mark.parametrize("t,t_next", [(999, 979), (500, 300), (40, 0)])
def test_ddim_with_eta_0_is_an_euler_step_of_the_probability_flow_ode(t, t_next):
    """II.6: in xbar = x / sqrt(alpha_bar) and sigmabar = sqrt((1 - alpha_bar) / alpha_bar),
    DDIM's step is xbar_s = xbar_t + (sigmabar_s - sigmabar_t) eps, checked in float64 numpy."""
    s = dm.NoiseSchedule()
    g = torch.Generator().manual_seed(t)
    x_t, eps = torch.randn(2, 1, 3, 3, generator=g), torch.randn(2, 1, 3, 3, generator=g)
    ab = REF["alphas_cumprod"]
    sigmabar = lambda i: np.sqrt((1 - ab[i]) / ab[i])
    xbar_next = x_t.double().numpy() / np.sqrt(ab[t]) + (sigmabar(t_next) - sigmabar(t)) * \
        eps.double().numpy()
    mean, _, _ = dm.ddim_step(s, x_t, torch.full((2,), t), torch.full((2,), t_next), eps, clip=False)
    np.testing.assert_allclose(mean.numpy() / np.sqrt(ab[t_next]), xbar_next, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_a_perfect_noise_model_makes_dpm_solver_follow_the_exact_path_to_its_image(steps):
    """With one image x0 as the whole data set the ODE's path is known in closed form: the noise
    in x stays eps_T = (x_T - alpha_T x0) / sigma_T, so at index t, x = alpha_t x0 + sigma_t eps_T."""
    s = dm.NoiseSchedule()
    x0 = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(3)) * 1.8 - 0.9
    ab = s.alphas_cumprod

    def perfect(x, t):      # the noise that makes x out of x0 at level t, Eq. 4 solved for eps
        a = ab[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    x_T = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    alpha, sigma = np.sqrt(REF["alphas_cumprod"]), np.sqrt(1 - REF["alphas_cumprod"])
    eps_T = (x_T.double().numpy() - alpha[999] * x0.double().numpy()) / sigma[999]
    ts, path = dm.ddim_timesteps(1000, steps) + [-1], []
    out = dm.dpm_solver_sample(perfect, s, x_T, steps=steps, on_step=lambda i, x, _: path.append(x))
    for i, x in enumerate(path[:-1]):
        t = ts[i + 1]
        want = alpha[t] * x0.double().numpy() + sigma[t] * eps_T
        np.testing.assert_allclose(x.numpy(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_dpm_solver_calls_the_network_once_per_step_on_ddims_grid():
    seen = []
    steps = []
    dm.dpm_solver_sample(lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x),
                         dm.NoiseSchedule(), torch.zeros(2, 1, 2, 2), steps=7,
                         on_step=lambda i, x, x0: steps.append(i))
    assert seen == dm.ddim_timesteps(1000, 7) and steps == list(range(7))


# --- II.7 flow matching ---------------------------------------------------------------------------

def test_flow_sample_moves_by_a_constant_velocity_exactly():
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    c = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    for steps in (1, 7, 50):
        torch.testing.assert_close(dm.flow_sample(lambda x, t: c, x_T, steps), x_T - c)


@pytest.mark.parametrize("a,steps", [(0.5, 10), (1.0, 50), (-0.3, 3)])
def test_flow_sample_of_a_linear_velocity_is_euler_in_closed_form(a, steps):
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    got = dm.flow_sample(lambda x, t: a * x, x_T, steps)
    torch.testing.assert_close(got, x_T * (1 - a / steps) ** steps, rtol=1e-5, atol=1e-6)


def test_flow_sample_hands_the_network_times_1_down_to_1_over_steps_on_the_ddpm_clock():
    seen, x0s = [], []
    dm.flow_sample(lambda x, t: seen.append(t.tolist()) or torch.ones_like(x), torch.zeros(2, 1, 2, 2), 4,
                   on_step=lambda i, x, x0: x0s.append(x0[0, 0, 0, 0].item()))
    assert seen == [[999.0] * 2, [749.25] * 2, [499.5] * 2, [249.75] * 2]      # (T - 1) t, t = 1 .. 1/4
    # the predicted x_0 is where the line through x with slope v lands, x - t v: for a constant
    # velocity the same point x_T - v at every step
    assert x0s == [-1.0] * 4


def test_flow_loss_is_its_formula_for_fixed_draws():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1, torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.3, 0.97])
    loss, err = dm.flow_loss(stand_in, None, dm.Batch(x0, t, eps))
    x0n, epsn, tn = x0.double().numpy(), eps.double().numpy(), t.double().numpy()[:, None, None, None]
    x_t = (1 - tn) * x0n + tn * epsn
    want = ((epsn - x0n - stand_in_np(x_t, 999 * tn)) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(err.numpy(), want, rtol=1e-5)
    assert loss.item() == pytest.approx(want.mean(), rel=1e-5)


def test_the_flow_draw_is_uniform_in_time_and_binned_in_quarters():
    b = dm.flow_draw(torch.zeros(4000, 1, 2, 2), torch.Generator().manual_seed(0))
    assert b.t.dtype == torch.float32 and 0 <= b.t.min() and b.t.max() < 1
    assert abs(b.t.mean().item() - 0.5) < 0.02 and abs(b.eps.std().item() - 1) < 0.02
    flow, eps = dm.RunConfig(objective="flow"), dm.RunConfig()
    assert dm.noise_bin(torch.tensor([0.0, 0.2499, 0.25, 0.75, 0.9999]), flow).tolist() == [0, 0, 1, 3, 3]
    assert dm.noise_bin(torch.tensor([0, 249, 250, 999]), eps).tolist() == [0, 0, 1, 3]
    assert dm.noise_bin_names(flow) == ["loss_t0.00-0.25", "loss_t0.25-0.50", "loss_t0.50-0.75",
                                        "loss_t0.75-1.00"]
    assert dm.noise_bin_names(eps)[0] == "loss_t1-250"


def test_loss_csv_columns_name_the_steps_each_quarter_holds_for_any_T():
    """Each column's t range is the paper's t (index + 1) of the indices noise_bin puts in that
    quarter, counted one by one, for T that 4 divides and T that it does not."""
    for T in (10, 13, 999, 1000):
        cfg = dm.RunConfig(T=T)
        quarter = dm.noise_bin(torch.arange(T), cfg).tolist()
        want = [f"loss_t{quarter.index(b) + 1}-{T - quarter[::-1].index(b)}" for b in range(4)]
        assert dm.noise_bin_names(cfg) == want, T


def test_guidance_mixes_velocities_as_it_mixes_noises():
    def v_model(x, t, y):                   # a label-dependent field; y = 10 is the null label
        return x * (1 + y.float().view(-1, 1, 1, 1) / 10)
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    y, s = torch.tensor([3, 7]), 2.5
    got = dm.flow_sample(dm.guided(v_model, y, s, 10), x_T, 5)
    k = 1 + 1 + s * (y.float() / 10 - 1)    # the guided field: v_null + s (v_y - v_null), linear in x
    torch.testing.assert_close(got, x_T * (1 - k.view(-1, 1, 1, 1) / 5) ** 5, rtol=1e-5, atol=1e-6)


def test_a_conditional_flow_loss_hands_the_labels_to_the_network():
    seen = []
    b = dm.LabelledBatch(torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 0.5]), torch.zeros(2, 1, 2, 2),
                         torch.tensor([4, 10]))
    loss_fn = dm.training_loss(dm.RunConfig(objective="flow", num_classes=10))
    loss_fn(lambda x, t, y: seen.append(y.tolist()) or torch.zeros_like(x), None, b)
    assert seen == [[4, 10]]


# --- the command line -----------------------------------------------------------------------------

def train_args(*flags):
    return dm.build_parser().parse_args(["train", "--run-dir", "/nonexistent/run", *flags])


def test_a_flow_keeps_the_case_study_recipe_and_drops_what_cannot_apply(capsys):
    cfg, _ = dm.train_config(train_args("--objective", "flow"))
    assert cfg == dm.RunConfig(objective="flow")
    cfg, _ = dm.train_config(train_args("--preset", "cpu", "--objective", "flow"))
    assert (cfg.schedule, cfg.min_snr_gamma, cfg.lr_schedule, cfg.channels) == \
        ("linear", 0.0, "cosine", (32, 64, 128, 128))
    assert "schedule cosine and min_snr_gamma 5.0 do not apply" in capsys.readouterr().err
    for flags in (("--schedule", "cosine"), ("--min-snr-gamma", "5")):
        with pytest.raises(dm.UserError, match="flow model"):
            dm.train_config(train_args("--objective", "flow", *flags))
    with pytest.raises(dm.UserError, match="flow model"):
        dm.config_from_dict(dict(objective="flow", schedule="cosine"), "f.pt")


def sampler_args(**kw):
    return argparse.Namespace(**{**dict(sampler=None, steps=None, eta=0.0, no_clip=False), **kw})


def test_each_model_gets_its_samplers_and_steps_up_to_its_own_T():
    flow, eps, short = dm.RunConfig(objective="flow"), dm.RunConfig(), dm.RunConfig(T=10)
    assert dm.sampler_from_args(sampler_args(), flow) == dm.Sampler("euler", 50)
    assert dm.sampler_from_args(sampler_args(), eps) == dm.Sampler("ddim", 50)
    assert dm.sampler_from_args(sampler_args(sampler="dpm++"), eps) == dm.Sampler("dpm++", 20)
    assert dm.sampler_from_args(sampler_args(sampler="ddpm"), short) == dm.Sampler("ddpm", 10)
    assert dm.sampler_from_args(sampler_args(steps=10), short).timesteps(10) == list(range(9, -1, -1))
    for args, cfg, says in [(sampler_args(sampler="ddim"), flow, "flow model"),
                            (sampler_args(sampler="dpm++"), flow, "flow model"),
                            (sampler_args(sampler="euler"), eps, "predicts noise"),
                            (sampler_args(), short, "T=10"),             # DDIM's default 50 > T
                            (sampler_args(sampler="dpm++", eta=1.0), eps, "only DDIM has eta"),
                            (sampler_args(eta=0.5), flow, "only DDIM has eta")]:
        with pytest.raises(dm.UserError, match=says):
            dm.sampler_from_args(args, cfg)


@pytest.fixture(scope="module")
def flow_run(mnist_dir, tmp_path_factory):
    """A tiny flow model: 2 epochs (16 steps) on the synthetic digits, and the same run cut at
    step 5 and resumed."""
    root = tmp_path_factory.mktemp("flow")
    args = [*TINY_ARGS, "--epochs", "2", "--objective", "flow", "--data-dir", str(mnist_dir)]
    dm.main(["train", *args, "--run-dir", str(root / "ref")])
    dm.main(["train", *args, "--grid-n", "0", "--run-dir", str(root / "cut"), "--max-steps", "5"])
    dm.main(["train", "--run-dir", str(root / "cut"), "--resume", "--data-dir", str(mnist_dir),
             "--device", "cpu"])
    return root


def test_a_flow_run_trains_records_its_objective_and_resumes_bitwise(flow_run):
    a, b = (torch.load(flow_run / r / "ckpt.pt", weights_only=True) for r in ("ref", "cut"))
    assert a["config"]["objective"] == "flow" and a["step"] == b["step"] == 16
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    header = (flow_run / "ref" / "loss.csv").read_text().splitlines()[0]
    assert header.endswith("loss_t0.00-0.25,loss_t0.25-0.50,loss_t0.50-0.75,loss_t0.75-1.00")
    assert (flow_run / "ref" / "grid_epoch002.png").exists()


def test_a_flow_model_samples_with_euler_and_refuses_the_noise_samplers(flow_run, tiny_run, tmp_path,
                                                                         capsys):
    ckpt = flow_run / "ref" / "ckpt.pt"
    out = tmp_path / "f.npz"
    dm.main(["sample", "--ckpt", str(ckpt), "--n", "3", "--steps", "4", "--format", "npz",
             "--out", str(out), "--device", "cpu"])
    assert np.load(out)["images"].shape == (3, 28, 28)
    assert "euler 4 steps" in capsys.readouterr().out
    gif = tmp_path / "f.gif"
    dm.main(["sample", "--ckpt", str(ckpt), "--n", "2", "--steps", "4", "--gif", "--out", str(gif),
             "--device", "cpu"])
    from PIL import Image
    assert Image.open(gif).n_frames == 4
    capsys.readouterr()
    for ck, sampler in ((ckpt, "ddim"), (ckpt, "ddpm"), (ckpt, "dpm++"), (tiny_run / "ckpt.pt", "euler")):
        with pytest.raises(SystemExit) as e:
            dm.main(["sample", "--ckpt", str(ck), "--sampler", sampler, "--n", "2",
                     "--out", str(tmp_path / "x.png"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "--sampler" in err
    with pytest.raises(SystemExit) as e:                 # Euler's steps have no x_0 to clip
        dm.main(["sample", "--ckpt", str(ckpt), "--no-clip", "--n", "2",
                 "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert e.value.code == 2 and "--no-clip" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_flow_model_in_torchs_legacy_format_is_still_known_as_one(flow_run, tmp_path, capsys):
    """A file torch.load reads but cannot open without reading it whole (the pre-1.6 format):
    the sampler still follows its config, euler by default, the noise samplers refused."""
    legacy = tmp_path / "legacy_flow.pt"
    ck = torch.load(flow_run / "ref" / "ckpt.pt", weights_only=True)
    torch.save(ck, legacy, _use_new_zipfile_serialization=False)
    dm.main(["sample", "--ckpt", str(legacy), "--n", "2", "--steps", "3", "--format", "npz",
             "--out", str(tmp_path / "f.npz"), "--device", "cpu"])
    assert "euler 3 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        dm.main(["sample", "--ckpt", str(legacy), "--sampler", "ddim", "--n", "2",
                 "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert e.value.code == 2 and "--sampler" in capsys.readouterr().err


def test_compare_has_dpm_solver_rows_for_a_noise_model_and_euler_rows_for_a_flow(
        flow_run, tiny_run, mnist_dir, classifier, tmp_path, capsys):
    for ckpt, want in ((flow_run / "ref" / "ckpt.pt", ["Euler 10", "Euler 20", "Euler 50"]),
                       (tiny_run / "ckpt.pt", ["DPM++ 10", "DPM++ 20"])):
        out = tmp_path / "c.png"
        dm.main(["compare", "--ckpt", str(ckpt), "--n", "4", "--data-dir", str(mnist_dir),
                 "--classifier", str(classifier), "--out", str(out), "--device", "cpu"])
        names = [" ".join(line.split()[:2]) for line in capsys.readouterr().out.splitlines()]
        assert all(w in names for w in want) and out.exists()
        out.unlink()


def test_sample_dpm_solver_writes_its_default_file(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").mkdir()
    dm.main(["sample", "--ckpt", str(tiny_run / "ckpt.pt"), "--sampler", "dpm++", "--n", "4",
             "--device", "cpu"])
    assert (tmp_path / "samples" / "dpmpp_20.png").exists()
    assert "dpm++ 20 steps" in capsys.readouterr().out


def test_compare_rows_follow_the_models_T_and_objective():
    """The case study's T gives the rows README's tables show; a model of T = 30 gets DDPM's 30
    steps and only the rows with at most 30 steps; a flow model Euler's."""
    names = lambda cfg: [name for name, _ in dm.compare_rows(cfg)]
    assert names(dm.RunConfig()) == ["DDPM 1000", "DDIM 10", "DDIM 20", "DDIM 50", "DDIM 100",
                                     "DDIM 50, eta 1", "DPM++ 10", "DPM++ 20"]
    assert names(dm.RunConfig(T=30)) == ["DDPM 30", "DDIM 10", "DDIM 20", "DPM++ 10", "DPM++ 20"]
    assert dm.compare_rows(dm.RunConfig(T=30))[0][1].steps == 30
    assert names(dm.RunConfig(objective="flow")) == ["Euler 10", "Euler 20", "Euler 50"]
