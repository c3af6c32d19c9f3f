"""The CIFAR-10 extension on a tiny synthetic copy in torchvision's format: 32 px colour
end to end, the network's attention and flips, and MNIST left exactly as it was."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_mnist as dm
from conftest import cli


def make_cifar(root, n=8):
    """cifar-10-batches-py as torchvision reads it: pickled dicts of (n, 3072) uint8 rows
    (the red plane, then green, then blue, each 32x32) and their labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
    return root


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)   # synthetic files: no MD5s
    return make_cifar(tmp_path / "data")


def test_cifar10_trains_and_samples_in_colour(cifar_dir, tmp_path):
    images, labels = dm.load_cifar10(cifar_dir)
    assert images.shape == (40, 32, 32, 3) and images.dtype == torch.uint8 and len(labels) == 40
    # torchvision's layout: row k of a batch holds image k as R, G, B planes
    with open(cifar_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        row = pickle.load(f)["data"][0]
    assert np.array_equal(images[0].numpy(), row.reshape(3, 32, 32).transpose(1, 2, 0))
    run = tmp_path / "run"
    dm.main(["train", "--preset", "cifar10", "--channels", "8,8,16,16", "--batch-size", "8", "--epochs", "1",
             "--grid-n", "4", "--data-dir", str(cifar_dir), "--run-dir", str(run), "--device", "cpu"])
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    cfg = ck["config"]
    assert (cfg["dataset"], tuple(cfg["attn_sizes"]), cfg["dropout"], cfg["hflip"]) == ("cifar10", (16,), 0.1, True)
    assert ck["step"] == 5 and ck["model"]["stem.weight"].shape == (8, 3, 3, 3)
    assert any(k.startswith("enc.1.0.attn.") for k in ck["model"])        # attention at 16 px
    assert Image.open(run / "grid_epoch001.png").mode == "RGB"
    base = ["sample", "--ckpt", str(run / "ckpt.pt"), "--steps", "2", "--n", "3", "--device", "cpu"]
    dm.main(base + ["--format", "npz", "--out", str(tmp_path / "s.npz")])
    with np.load(tmp_path / "s.npz") as z:
        a = z["images"]
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    dm.main(base + ["--out", str(tmp_path / "s.png")])
    grid = Image.open(tmp_path / "s.png")
    assert grid.mode == "RGB" and grid.size == (2 * 34 + 2, 2 * 34 + 2)
    dm.main(base + ["--format", "png-dir", "--out", str(tmp_path / "pngs")])
    first = Image.open(tmp_path / "pngs" / "000000.png")
    assert first.mode == "RGB" and np.array_equal(np.array(first), a[0])
    dm.main(base + ["--gif", "--out", str(tmp_path / "s.gif")])
    dm.main(["export", "--ckpt", str(run / "ckpt.pt"), "--out", str(tmp_path / "w.pt")])
    model, back = dm.model_from_checkpoint(dm.load_checkpoint(tmp_path / "w.pt"))
    assert back.dataset == "cifar10" and model(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)).shape \
        == (1, 3, 32, 32)
    # evaluate and compare score digits: one line naming the route for CIFAR-10
    r = cli("evaluate", "--ckpt", run / "ckpt.pt", "--device", "cpu", "--out", tmp_path / "e.json")
    assert r.returncode == 2 and "pytorch-fid" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_run_with_dropout_resumes_bitwise(cifar_dir, tmp_path):
    """Dropout draws its masks from torch's own generator, which the checkpoint keeps: two
    epochs in one go, and the same cut at step 3 and resumed, end bit for bit alike."""
    args = ["--preset", "cifar10", "--channels", "8,8,16,16", "--batch-size", "8", "--epochs", "2",
            "--grid-n", "0", "--data-dir", str(cifar_dir), "--device", "cpu"]
    dm.main(["train", *args, "--run-dir", str(tmp_path / "whole")])
    dm.main(["train", *args, "--max-steps", "3", "--run-dir", str(tmp_path / "cut")])
    dm.main(["train", "--resume", "--data-dir", str(cifar_dir), "--device", "cpu",
             "--run-dir", str(tmp_path / "cut")])
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("whole", "cut"))
    assert a["config"]["dropout"] > 0 and a["step"] == b["step"] == 10
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_unet_at_32_px_with_attention():
    net = dm.CifarUNet((8, 8, 16, 16), 1, attn_sizes=(16,), dropout=0.1)
    assert net.sizes == [32, 16, 8, 4]
    # one attention after each block of the 16 px level, on the way down and on the way up
    assert sorted(n for n, m in net.named_modules() if isinstance(m, dm.SelfAttention)) == ["dec.1.0.attn", "enc.1.0.attn"]
    out = net(torch.randn(2, 3, 32, 32), torch.tensor([0, 999]))
    assert out.shape == (2, 3, 32, 32)


def test_self_attention_is_softmax_attention_by_hand():
    torch.manual_seed(0)
    att = dm.SelfAttention(8)
    x = torch.randn(2, 8, 3, 3)
    h = att.norm(x)
    qkv = att.qkv.weight.view(24, 8) @ h.flatten(2) + att.qkv.bias.view(24, 1)     # (B, 3C, HW)
    q, k, v = qkv[:, :8], qkv[:, 8:16], qkv[:, 16:]                                 # (B, C, HW) each
    w = torch.softmax(q.transpose(1, 2) @ k / 8 ** 0.5, dim=-1)                     # (B, HW, HW): row i over j
    o = v @ w.transpose(1, 2)                                                       # (B, C, HW)
    want = x + (att.proj.weight.view(8, 8) @ o + att.proj.bias.view(8, 1)).view(2, 8, 3, 3)
    torch.testing.assert_close(att(x), want, rtol=1e-5, atol=1e-5)


def test_flips_mirror_whole_images_along_the_width():
    x = torch.randn(64, 3, 4, 5)
    out = dm.random_hflip(x, torch.Generator().manual_seed(0))
    flipped = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.5
    for i in range(64):
        want = x[i].flip(-1) if flipped[i] else x[i]
        assert torch.equal(out[i], want)
        assert torch.equal(out[i][..., 0], x[i][..., -1]) == bool(flipped[i])
    assert 16 < int(flipped.sum()) < 48


def test_the_mnist_network_is_unchanged():
    net = dm.make_unet(dm.RunConfig())
    assert sum(p.numel() for p in net.parameters()) == 11_595_521
    assert not [k for k in net.state_dict() if "attn" in k or "dropout" in k]
    assert not dm.PRESETS["paper"].hflip and dm.PRESETS["paper"].attn_sizes == ()


def test_missing_cifar10_is_one_line_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("train", "--dataset", "cifar10", "--data-dir", tmp_path / "empty", "--run-dir", tmp_path / "run",
            "--device", "cpu", timeout=180)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cifar-10-batches-py" in r.stderr and str(tmp_path / "empty") in r.stderr
    assert not (tmp_path / "run").exists()
