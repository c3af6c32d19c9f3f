"""Shared test fixtures: a tiny synthetic MNIST in torchvision's raw IDX layout, so the
real loading code runs without network or the real data set."""
import struct
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_digits(n, seed=0):
    """uint8 (n, 28, 28) images and labels: class k is a bright bar in the k-th of ten
    positions plus faint noise, so a classifier can learn it in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (torch.rand(n, 28, 28, generator=g) * 40).to(torch.uint8)
    for i, k in enumerate(labels.tolist()):
        images[i, 2 + 2 * k: 5 + 2 * k, 4:24] = 255
    return images, labels


def write_idx(path, tensor):
    dims = tensor.shape
    magic = 0x0803 if len(dims) == 3 else 0x0801
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims))
        f.write(tensor.numpy().tobytes())


def make_mnist(root, n_train=256, n_test=100):
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels.to(torch.uint8))
    return Path(root)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("data"))


TINY_ARGS = ["--channels", "8,8,16,16", "--batch-size", "32", "--grid-n", "8", "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_run(mnist_dir, tmp_path_factory):
    """A tiny model trained for 2 epochs (16 steps) on the synthetic digits."""
    import ddpm_mnist as dm
    run = tmp_path_factory.mktemp("run") / "tiny"
    dm.main(["train", *TINY_ARGS, "--epochs", "2", "--data-dir", str(mnist_dir), "--run-dir", str(run)])
    return run


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """Where the evaluation classifier of the synthetic digits is cached: the first test
    that evaluates trains it, the others reuse it."""
    return tmp_path_factory.mktemp("clf") / "clf.pt"


def cli(*args, cwd=None, timeout=120):
    """Run the real command line in a fresh interpreter."""
    import subprocess
    return subprocess.run([sys.executable, str(ROOT / "ddpm_mnist.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
