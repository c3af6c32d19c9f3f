"""The teaching pictures: each command writes a valid image of the stated size."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_mnist as dm


def test_forward_strip(mnist_dir, tmp_path):
    out = tmp_path / "f.png"
    dm.main(["forward", "--data-dir", str(mnist_dir), "--n", "3", "--out", str(out)])
    cell = 28 * 3 + 2
    w, h = Image.open(out).size
    assert w == 2 + 8 * cell and h > 2 + 3 * cell                  # 8 t-columns, labels below


def test_forward_strip_keeps_the_digit_early_and_is_noise_late():
    from conftest import synthetic_digits
    images, _ = synthetic_digits(2)
    img = dm.forward_picture(images, dm.NoiseSchedule())
    a = torch.from_numpy(np.array(img)).float()
    cell = 28 * 3 + 2
    x = images.float()

    def corr(r, c):   # correlation of a drawn cell (downsampled x3) with the clean digit
        tile = a[2 + r * cell: 2 + r * cell + 84: 3, 2 + c * cell: 2 + c * cell + 84: 3]
        return torch.corrcoef(torch.stack([tile.flatten(), x[r].flatten()]))[0, 1].item()
    for r in range(2):
        assert corr(r, 0) > 0.99 and corr(r, 1) > 0.8             # t = 0, 50: the digit
        assert abs(corr(r, 7)) < 0.2                               # t = 999: noise


def test_gif_has_the_stated_frames_for_both_samplers(tiny_run, tmp_path):
    for sampler, steps, frames in (("ddim", 10, 10), ("ddpm", None, 50)):
        out = tmp_path / f"{sampler}.gif"
        dm.main(["sample", "--ckpt", str(tiny_run / "ckpt.pt"), "--sampler", sampler, "--n", "4", "--gif",
                 "--out", str(out), "--device", "cpu"] + (["--steps", str(steps)] if steps else []))
        img = Image.open(out)
        assert img.format == "GIF" and img.n_frames == frames
    assert dm.frame_indices(1000)[-1] == 999 and len(dm.frame_indices(1000)) == 50


def test_export_writes_the_ema_in_fp16_and_sampling_reads_it(tiny_run, tmp_path):
    """samples/ema_fp16.pt's format: the EMA weights rounded to fp16, the config and how long the
    model trained, nothing else; samples from it match the full checkpoint's up to that rounding."""
    ck = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    dm.main(["export", "--ckpt", str(tiny_run / "ckpt.pt"), "--out", str(tmp_path / "e.pt")])
    e = torch.load(tmp_path / "e.pt", weights_only=True)
    assert set(e) == {"ema", "config", "trained"} and e["config"] == ck["config"]
    assert e["trained"]["step"] == ck["step"] == 16 and e["trained"]["epochs"] == 2.0 and e["trained"]["device"] == "cpu"
    assert e["trained"]["seconds"] == ck["seconds"] > 0
    assert e["ema"].keys() == ck["ema"].keys()
    for k, v in ck["ema"].items():
        assert e["ema"][k].dtype == torch.float16 and torch.equal(e["ema"][k], v.half()), k
    outs = {}
    for name in ("ckpt.pt", "e.pt"):
        outs[name] = tmp_path / f"{name}.npz"
        dm.main(["sample", "--ckpt", str((tiny_run if name == "ckpt.pt" else tmp_path) / name), "--n", "8",
                 "--steps", "5", "--format", "npz", "--out", str(outs[name]), "--device", "cpu"])
    full, half = (np.load(outs[n])["images"].astype(float) for n in ("ckpt.pt", "e.pt"))
    assert np.abs(full - half).mean() < 2.0          # in uint8 levels, of 255


@pytest.mark.parametrize("name", ["ema_fp16.pt", "ema_cpu_fp16.pt", "ema_cond_fp16.pt"])
def test_the_committed_fp16_weights_load(name):
    path = Path(__file__).parent.parent / "samples" / name
    e = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in e["ema"].values())
    model, cfg = dm.model_from_checkpoint(dm.load_checkpoint(path))
    assert dm.count_params(model) == sum(v.numel() for v in e["ema"].values())
    assert cfg.channels == dm.PRESETS[cfg.preset].channels
    assert e["trained"]["step"] > 0 and e["trained"]["epochs"] > 1 and e["trained"]["device"].split()[0] in ("cpu", "cuda")
