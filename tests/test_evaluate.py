"""evaluate and compare: the Frechet distance against closed forms, the class statistics
on hand-made outputs, the memorization check against numpy, exact exports, and both commands
end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_mnist as dm
from conftest import cli


def test_frechet_distance_of_two_known_gaussians():
    """For diagonal covariances the distance is |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    want = 5.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    got = dm.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(want, abs=1e-9)
    # a rotation of both Gaussians changes nothing (the formula is basis-free)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    got_rot = dm.frechet_distance(q @ mu1.double(), q @ torch.diag(s1).double() @ q.T,
                                  q @ mu2.double(), q @ torch.diag(s2).double() @ q.T)
    assert got_rot == pytest.approx(want, abs=1e-9)


def test_frechet_distance_of_features_with_themselves_and_shifted():
    f = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = f @ torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mu, sigma = dm.gaussian_fit(f)
    assert abs(dm.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    shift = torch.full((16,), 0.5, dtype=torch.float64)
    mu2, sigma2 = dm.gaussian_fit(f + shift)
    assert dm.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(16 * 0.25, rel=1e-6)
    mu3, sigma3 = dm.gaussian_fit(f + 2 * shift)
    assert dm.frechet_distance(mu, sigma, mu3, sigma3) == pytest.approx(4 * 16 * 0.25, rel=1e-6)


def test_class_stats_on_hand_made_outputs():
    probs = torch.zeros(10, 10)
    for i, (k, p) in enumerate([(0, .95), (0, .99), (0, .5), (1, .91), (2, .3), (3, 1.), (3, .89),
                                (4, .9), (5, .97), (9, .6)]):
        probs[i] = (1 - p) / 9
        probs[i, k] = p
    s = dm.class_stats(probs)
    assert s["class_counts"] == [3, 1, 1, 2, 1, 1, 0, 0, 0, 1]
    assert s["rarest_share"] == 0.0 and s["commonest_share"] == pytest.approx(0.3)
    assert s["confident_share"] == pytest.approx(0.6)      # .95 .99 .91 1. .9 .97


def test_memorization_against_numpy_nearest_distances():
    """Nearest-training-image distances of samples and of test images, every output checked
    against a numpy brute force: 3 copies of training images among 10 samples are a share of
    0.3 below the test images' 1% quantile; n caps the samples scored across several batches."""
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 28, 28), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (30, 28, 28), generator=g, dtype=torch.uint8)
    samples = torch.cat([train[:3], torch.randint(0, 256, (7, 28, 28), generator=g, dtype=torch.uint8)])

    def nearest(q):                                   # every pair, in float64
        q, ref = q.numpy().reshape(len(q), 1, -1) / 255.0, train.numpy().reshape(1, len(train), -1) / 255.0
        return np.sqrt(((q - ref) ** 2).sum(-1)).min(1)
    d_samples, d_test = nearest(samples), nearest(test)
    r = dm.memorization(samples, train, test, torch.device("cpu"))
    lower_median = lambda d: np.sort(d)[(len(d) - 1) // 2]                # torch's median
    assert r["nn_dist_samples_median"] == pytest.approx(lower_median(d_samples), rel=1e-4)
    assert r["nn_dist_real_test_median"] == pytest.approx(lower_median(d_test), rel=1e-4)
    assert r["real_test_p01"] == pytest.approx(np.quantile(d_test, 0.01), rel=1e-4)
    assert r["n_memo"] == 10 and r["share_closer_than_real_p01"] == pytest.approx(0.3)
    many = samples.repeat(60, 1, 1)                                       # 600 samples: two batches of 500
    assert dm.memorization(many, train, test, torch.device("cpu"), n=550)["n_memo"] == 550


def test_npz_and_png_dir_exports_round_trip_exactly(tiny_run, tmp_path):
    base = ["sample", "--ckpt", str(tiny_run / "ckpt.pt"), "--steps", "3", "--n", "5", "--device", "cpu"]
    dm.main(base + ["--format", "npz", "--out", str(tmp_path / "s.npz")])
    dm.main(base + ["--format", "png-dir", "--out", str(tmp_path / "pngs")])
    with np.load(tmp_path / "s.npz") as z:
        a = z["images"]
    assert a.shape == (5, 28, 28) and a.dtype == np.uint8
    pngs = sorted((tmp_path / "pngs").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.stack([np.array(Image.open(p)) for p in pngs]), a)
    images, labels = dm.read_samples(tmp_path / "s.npz")
    assert np.array_equal(images.numpy(), a) and labels is None


def test_evaluate_end_to_end(tiny_run, mnist_dir, classifier, tmp_path, capsys):
    out = tmp_path / "evaluate.json"
    dm.main(["evaluate", "--ckpt", str(tiny_run / "ckpt.pt"), "--n", "40", "--steps", "5", "--data-dir",
             str(mnist_dir), "--classifier", str(classifier), "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["n"] == 40 and sum(r["class_counts"]) == 40 and np.isfinite(r["fid"]) and r["fid"] >= 0
    assert 0 <= r["confident_share"] <= 1 and r["rarest_share"] <= 0.1 <= r["commonest_share"]
    assert r["fid_real_train"] < r["fid"]           # real digits beat 16 steps of training
    assert "Classifier, penultimate" in text and "MNIST test set" in text and "N=40" in text
    assert classifier.exists()
    # the same classifier scores a saved npz; the default report lands beside the npz
    dm.main(["sample", "--ckpt", str(tiny_run / "ckpt.pt"), "--steps", "5", "--n", "40", "--format", "npz",
             "--out", str(tmp_path / "s.npz"), "--device", "cpu"])
    dm.main(["evaluate", "--ckpt", str(tmp_path / "none.pt"), "--samples", str(tmp_path / "s.npz"), "--data-dir",
             str(mnist_dir), "--classifier", str(classifier), "--device", "cpu"])
    r2 = json.loads((tmp_path / "evaluate.json").read_text())
    assert r2["fid"] == pytest.approx(r["fid"])     # same seed, same samples, same score


def test_a_wrong_npz_is_refused(tmp_path, mnist_dir, classifier):
    np.savez(tmp_path / "f.npz", images=np.zeros((4, 28, 28), dtype=np.float32))
    r = cli("evaluate", "--samples", tmp_path / "f.npz", "--data-dir", mnist_dir, "--classifier", classifier,
            "--out", tmp_path / "e.json")
    assert r.returncode == 2 and "uint8 (N, 28, 28)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_compare_end_to_end(tiny_run, mnist_dir, classifier, tmp_path, capsys):
    out = tmp_path / "compare.png"
    dm.main(["compare", "--ckpt", str(tiny_run / "ckpt.pt"), "--n", "6", "--data-dir", str(mnist_dir),
             "--classifier", str(classifier), "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    names = ("DDPM 1000", "DDIM 10", "DDIM 20", "DDIM 50", "DDIM 100", "DDIM 50, eta 1", "DPM++ 10", "DPM++ 20")
    for name in names:
        assert name in text
    img = Image.open(out)
    assert img.size[1] == 2 + len(names) * (56 + 2)  # one row per sampler, 28 px at scale 2
