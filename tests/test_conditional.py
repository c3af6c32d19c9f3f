"""Extension: class conditioning and classifier-free guidance, against hand computations,
on the tiny synthetic digits."""
import math
import types

import numpy as np
import pytest
import torch

import ddpm_mnist as dm
from conftest import TINY_ARGS
from test_cli import in_process


@pytest.fixture(scope="module")
def cond_run(mnist_dir, tmp_path_factory):
    """A tiny class-conditional model, 2 epochs (16 steps) on the synthetic digits."""
    run = tmp_path_factory.mktemp("cond") / "run"
    dm.main(["train", *TINY_ARGS, "--cond", "--epochs", "2", "--data-dir", str(mnist_dir), "--run-dir", str(run)])
    return run


# --- training: label dropout ------------------------------------------------------------

def test_label_dropout_share_is_within_binomial_bounds():
    n, p = 20000, 0.1
    y = torch.arange(n) % 10
    out = dm.drop_labels(y, p, 10, torch.Generator().manual_seed(0))
    dropped = (out == 10).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)          # 5 sigma: 0.0106
    kept = out != 10
    assert torch.equal(out[kept], y[kept])                             # the others keep their label
    assert (dm.drop_labels(y, 1.0, 10, torch.Generator()) == 10).all()
    assert torch.equal(dm.drop_labels(y, 0.0, 10, torch.Generator()), y)


def test_conditional_loss_hands_the_labels_to_the_network_and_draws_as_without_them():
    """With labels the loss calls eps_model(x_t, t, y); the batch's t and eps come from the
    generator exactly as without labels, and the labels are dropped before them."""
    seen = {}

    def stand_in(x, t, y=None):
        seen["y"] = y
        return torch.zeros_like(x)
    x0 = torch.zeros(6, 1, 28, 28)
    schedule = dm.make_schedule(dm.RunConfig())
    b = dm.draw_batch(x0, schedule.T, torch.Generator().manual_seed(3))
    y = torch.tensor([1, 2, 3, 10, 10, 4])
    loss, _ = dm.conditional_loss(stand_in, schedule, dm.LabelledBatch(b.x0, b.t, b.eps, y))
    assert torch.equal(seen["y"], y)
    assert torch.equal(loss, dm.diffusion_loss(stand_in, schedule, b)[0])
    # a conditional run's draw: labels dropped first, then the same t and eps as a plain draw
    cfg = dm.RunConfig(num_classes=10, p_uncond=0.5)
    p = types.SimpleNamespace(gen=torch.Generator().manual_seed(5), schedule=schedule)
    data, labels = torch.zeros(6, 28, 28, dtype=torch.uint8), torch.arange(6)
    lb = dm.training_draw(cfg, data, labels, p)(torch.arange(6))
    g = torch.Generator().manual_seed(5)
    dropped = dm.drop_labels(labels, 0.5, 10, g)
    plain = dm.draw_batch(dm.to_model_range(data), schedule.T, g)
    assert torch.equal(lb.y, dropped) and torch.equal(lb.t, plain.t) and torch.equal(lb.eps, plain.eps)


# --- the network ----------------------------------------------------------------------

def test_the_unconditional_network_is_unchanged_and_the_conditional_adds_one_embedding():
    plain = dm.UNet()
    assert dm.count_params(plain) == 11_595_521                        # the case study's network
    assert not any("label" in k for k in plain.state_dict())
    cond = dm.make_unet(dm.RunConfig(num_classes=10))
    extra = set(cond.state_dict()) - set(plain.state_dict())
    assert extra == {"label_emb.weight"}
    assert dm.count_params(cond) - dm.count_params(plain) == 11 * 4 * 64   # 10 digits + null, t_dim wide


def test_the_conditional_output_depends_on_y_and_no_label_is_the_null_label():
    torch.manual_seed(0)
    net = dm.ConditionalUNet(channels=(8, 8, 16, 16), num_classes=10).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([500, 500])
    a, b = net(x, t, torch.tensor([3, 3])), net(x, t, torch.tensor([7, 7]))
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(net(x, t), net(x, t, torch.tensor([10, 10])))


# --- guidance -------------------------------------------------------------------------

def test_guidance_is_the_formula_by_hand():
    """A stand-in eps-model whose output is known per label; eps~ computed in numpy."""
    def stand_in(x, t, y):
        return x * (y.float() + 1).view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1) / 1000

    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t, y, null = torch.tensor([10, 500, 999]), torch.tensor([0, 4, 9]), 10
    xn, tn = x.numpy().astype(np.float64), t.numpy()[:, None, None, None] / 1000
    eps_y = xn * (y.numpy() + 1)[:, None, None, None] + tn
    eps_null = xn * (null + 1) + tn
    for s in (0.0, 1.0, 3.0):
        want = (1 - s) * eps_null + s * eps_y                           # = eps_null + s (eps_y - eps_null)
        got = dm.guided(stand_in, y, s, null)(x, t)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_guidance_is_one_forward_pass_of_the_doubled_batch():
    calls = []

    def stand_in(x, t, y):
        calls.append((len(x), y.tolist()))
        return torch.zeros_like(x)
    dm.guided(stand_in, torch.tensor([2, 5]), 3.0, 10)(torch.zeros(2, 1, 4, 4), torch.tensor([1, 1]))
    assert calls == [(4, [2, 5, 10, 10])]


def test_digit_rows_put_one_digit_on_each_row():
    assert dm.digit_rows(24, 8, 10).view(3, 8).tolist() == [[0] * 8, [1] * 8, [2] * 8]
    assert dm.digit_rows(12, 1, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_class_accuracy_and_spread_against_hand_values():
    probs = torch.zeros(4, 10)
    probs[[0, 1, 2, 3], [3, 3, 5, 1]] = 1.0                            # argmax: 3, 3, 5, 1
    r = dm.class_accuracy(probs, torch.tensor([3, 3, 1, 1]))
    assert r["class_accuracy"] == 0.75
    assert r["class_accuracy_per_digit"][3] == 1.0 and r["class_accuracy_per_digit"][1] == 0.5
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[1, 0, 0], images[3, 0, :4] = 255, 255                       # digit 0: distance 1; digit 1: 2
    assert dm.same_digit_distance(images, torch.tensor([0, 0, 1, 1])) == pytest.approx((1 + 2) / 2)


# --- the command line, on a tiny conditional run --------------------------------------------

def test_a_conditional_run_resumes_bitwise(mnist_dir, tmp_path):
    args = [*TINY_ARGS, "--grid-n", "0", "--epochs", "2", "--cond", "--p-uncond", "0.3", "--data-dir", str(mnist_dir)]
    dm.main(["train", *args, "--run-dir", str(tmp_path / "ref")])
    dm.main(["train", *args, "--run-dir", str(tmp_path / "cut"), "--max-steps", "5"])
    dm.main(["train", "--cond", "--run-dir", str(tmp_path / "cut"), "--resume", "--data-dir", str(mnist_dir),
             "--device", "cpu"])
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("ref", "cut"))
    assert a["config"]["num_classes"] == 10 and a["config"]["p_uncond"] == 0.3
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_sample_a_class_and_all_classes_with_their_labels(cond_run, tmp_path):
    ckpt = cond_run / "ckpt.pt"
    for digit, want in (("3", [3] * 6), ("all", [0, 0, 1, 1, 2, 2])):   # 6 samples: rows of 2
        out = tmp_path / f"{digit}.npz"
        dm.main(["sample", "--ckpt", str(ckpt), "--class", digit, "--guidance", "2", "--n", "6", "--steps", "3",
                 "--format", "npz", "--out", str(out), "--device", "cpu"])
        z = np.load(out)
        assert z["images"].shape == (6, 28, 28) and z["labels"].tolist() == want


def test_compare_guidance_draws_a_row_per_digit_and_a_column_per_scale(cond_run, mnist_dir, classifier, tmp_path,
                                                                     capsys):
    out = tmp_path / "guidance.png"
    dm.main(["compare", "--ckpt", str(cond_run / "ckpt.pt"), "--guidance", "0,1,3", "--n", "20",
             "--data-dir", str(mnist_dir), "--classifier", str(classifier), "--out", str(out),
             "--device", "cpu"])
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.strip() and line.split()[0] in ("0", "1", "3")]
    assert [r[0] for r in rows] == ["0", "1", "3"] and all(r[2].endswith("%") for r in rows)
    from PIL import Image
    w, h = Image.open(out).size
    cell = 28 * 2 + dm.GRID_PAD
    assert h >= 10 * cell and h < 11 * cell + 20                        # ten digits, one label line
    assert w >= 3 * cell and w < 4 * cell + 20                          # three scales


def test_evaluate_reads_the_labels_sample_wrote(cond_run, mnist_dir, classifier, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    dm.main(["sample", "--ckpt", str(cond_run / "ckpt.pt"), "--n", "12", "--steps", "2", "--format", "npz",
             "--out", str(npz), "--device", "cpu"])
    dm.main(["evaluate", "--samples", str(npz), "--data-dir", str(mnist_dir), "--classifier", str(classifier),
             "--device", "cpu"])
    import json
    r = json.loads((tmp_path / "evaluate.json").read_text())
    assert len(r["class_accuracy_per_digit"]) == 10 and "class accuracy" in capsys.readouterr().out


def test_evaluate_a_conditional_model_reports_class_accuracy(cond_run, mnist_dir, classifier, tmp_path):
    out = tmp_path / "e.json"
    dm.main(["evaluate", "--ckpt", str(cond_run / "ckpt.pt"), "--n", "20", "--steps", "3", "--guidance", "2",
             "--data-dir", str(mnist_dir), "--classifier", str(classifier), "--out", str(out),
             "--device", "cpu"])
    import json
    r = json.loads(out.read_text())
    assert r["guidance"] == 2.0 and 0 <= r["class_accuracy"] <= 1 and len(r["class_accuracy_per_digit"]) == 10


BAD_COND = [
    ("sample", "--class", "3"),                                        # runs/ddpm is unconditional
    ("sample", "--guidance", "2"),
    ("sample", "--class", "10"),
    ("sample", "--guidance", "-1"),
    ("compare", "--guidance", "0,1001"),
    ("evaluate", "--guidance", "2"),
    ("sample", "--ckpt", "runs/cond/ckpt.pt", "--guidance", "1001"),
    ("compare", "--guidance", "0,1"),
    ("compare", "--guidance", "1,-2"),
    ("compare", "--ckpt", "runs/cond/ckpt.pt", "--guidance", "0,1", "--n", "10"),   # not 2 of every digit
    ("train", "--run-dir", "runs/ddpm", "--resume", "--cond"),
    ("train", "--run-dir", "runs/cond", "--resume"),                   # conditional: needs --cond
    ("train", "--cond", "--p-uncond", "1.5", "--run-dir", "newrun"),
    ("train", "--p-uncond", "0.2", "--run-dir", "newrun"),
]


def test_bad_conditional_input_exits_2_with_one_line(tmp_path_factory, tiny_run, cond_run, mnist_dir):
    import os
    w = tmp_path_factory.mktemp("user")
    (w / "runs").mkdir()
    os.symlink(tiny_run, w / "runs" / "ddpm")
    os.symlink(cond_run, w / "runs" / "cond")
    os.symlink(mnist_dir, w / "data")
    (w / "samples").mkdir()
    for args in BAD_COND:
        r = in_process(args, w)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)
        flag = [a for a in args if a.startswith("--")][-1] if args[0] != "train" else None   # the flag at fault
        assert flag is None or flag in lines[0], (args, lines[0])
    assert not (w / "newrun").exists() and not any((w / "samples").iterdir())
