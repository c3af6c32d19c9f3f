"""The command line end to end on a tiny model, and bad input through the real CLI."""
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

import ddpm_mnist as dm
from conftest import cli


def test_train_writes_checkpoint_grids_csv_and_config(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"ckpt.pt", "config.json", "loss.csv", "grid_epoch001.png", "grid_epoch002.png"} <= names
    rows = (tiny_run / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,mean_loss,seconds,") and len(rows) == 3
    assert [r.split(",")[:2] for r in rows[1:]] == [["1", "8"], ["2", "16"]]
    ck = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    assert ck["step"] == 16 and tuple(ck["config"]["channels"]) == (8, 8, 16, 16)
    assert {"model", "ema", "opt", "rng", "config", "history"} <= set(ck)
    assert Image.open(tiny_run / "grid_epoch002.png").size == (8 * 30 + 2, 30 + 2)   # 8 per row, 2 px lines


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_writes_a_png_grid(tiny_run, tmp_path, sampler, capsys):
    out = tmp_path / f"{sampler}.png"
    dm.main(["sample", "--ckpt", str(tiny_run / "ckpt.pt"), "--sampler", sampler, "--n", "9", "--out", str(out),
             "--device", "cpu"])
    img = Image.open(out)
    img.verify()
    assert Image.open(out).size == (3 * 30 + 2, 3 * 30 + 2)
    assert f"wrote {out}" in capsys.readouterr().out


def test_same_seed_gives_byte_identical_pngs(tiny_run, tmp_path):
    outs = []
    for i, seed in enumerate((7, 7, 8)):
        outs.append(tmp_path / f"s{i}.png")
        dm.main(["sample", "--ckpt", str(tiny_run / "ckpt.pt"), "--sampler", "ddim", "--steps", "5", "--eta", "1",
                 "--n", "4", "--seed", str(seed), "--out", str(outs[-1]), "--device", "cpu"])
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].read_bytes() != outs[2].read_bytes()


def test_preset_cpu_builds_the_network_it_says(mnist_dir, tmp_path):
    dm.main(["train", "--preset", "cpu", "--max-steps", "1", "--grid-n", "0", "--batch-size", "16",
             "--data-dir", str(mnist_dir), "--run-dir", str(tmp_path / "r"), "--device", "cpu"])
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert tuple(ck["config"]["channels"]) == (32, 64, 128, 128) and ck["config"]["preset"] == "cpu"
    assert ck["model"]["stem.weight"].shape == (32, 1, 3, 3)
    assert ck["config"]["lr"] == dm.PRESETS["cpu"].lr and ck["config"]["epochs"] == dm.PRESETS["cpu"].epochs
    # the measured short-run recipe (samples/README.md, the lever table); the case study keeps none of it
    c = ck["config"]
    assert (c["schedule"], c["lr_schedule"], c["warmup_steps"], c["min_snr_gamma"], c["epochs"]) == \
        ("cosine", "cosine", 100, 5.0, 2) and dm.PRESETS["cpu"].batch_size == 32
    assert sum(v.numel() for v in ck["model"].values()) == sum(p.numel() for p in dm.UNet((32, 64, 128, 128)).parameters())


# --- bad input: one line on stderr, exit code 2, no traceback, nothing changed ------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_run, mnist_dir):
    """A folder as a user would have it: data, a run with a checkpoint, an output."""
    w = tmp_path_factory.mktemp("user")
    (w / "runs").mkdir()
    os.symlink(tiny_run, w / "runs" / "ddpm")
    os.symlink(mnist_dir, w / "data")
    (w / "out").mkdir()
    (w / "samples").mkdir()
    (w / "out" / "keep.png").write_bytes(b"user's file")
    (w / "empty").mkdir()
    (w / "notackpt.pt").write_text("hello")
    (w / "afile").write_text("x")
    import numpy as np
    np.savez(w / "bad.npz", images=np.zeros((5, 32, 32), dtype=np.uint8))
    return w


def snapshot(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


CUDA = torch.cuda.is_available()
BAD = [
    ("sample", "--sampler", "foo"),
    ("sample", "--steps", "0"),
    ("sample", "--steps", "1001"),
    ("sample", "--steps", "abc"),
    ("sample", "--eta", "-1"),
    ("sample", "--n", "0"),
    ("sample", "--batch-size", "0"),
    ("sample", "--device", "tpu"),
    ("sample", "--out", "nowhere/x.png"),
    ("sample", "--out", "out"),
    ("sample", "--out", "/proc/ddpm.png"),
    ("sample", "--ckpt", "missing.pt"),
    ("sample", "--ckpt", "notackpt.pt"),
    ("sample", "--sampler", "ddpm", "--steps", "50"),
    ("sample", "--format", "gif"),
    ("sample", "--gif", "--format", "npz"),
    ("sample", "--gif", "--out", "out/x.png"),
    ("sample", "--format", "png-dir", "--out", "out"),
    ("train", "--epochs", "0"),
    ("train", "--batch-size", "0"),
    ("train", "--lr", "0"),
    ("train", "--lr", "-1e-3"),
    ("train", "--lr", "nan"),
    ("train", "--channels", "64,128,256"),
    ("train", "--channels", "64,128,256,250"),
    ("train", "--channels", "a,b,c,d"),
    ("train", "--ema-decay", "1.5"),
    ("train", "--max-steps", "0"),
    ("train", "--schedule", "quadratic"),
    ("train", "--lr-schedule", "step"),
    ("train", "--min-snr-gamma", "-1"),
    ("train", "--seed", "-1"),
    ("train", "--run-dir", "runs/ddpm"),                     # has a checkpoint: needs --resume
    ("train", "--run-dir", "empty", "--resume"),
    ("train", "--run-dir", "runs/ddpm", "--resume", "--overwrite"),
    ("train", "--run-dir", "runs/ddpm", "--resume", "--lr", "0.1"),
    ("train", "--run-dir", "afile"),
    ("train", "--data-dir", "empty", "--run-dir", "newrun"),  # no MNIST there, no network
    ("evaluate", "--n", "1"),
    ("evaluate", "--samples", "bad.npz"),
    ("evaluate", "--samples", "notackpt.pt"),
    ("forward", "--n", "0"),
    ("sample", "--eta", "1.5"),
    ("sample", "--guidance", "1e308"),
    ("bench", "--batch-size", "0"),
    ("export", "--out", "runs/ddpm/ckpt.pt"),                 # over the checkpoint it reads
    ("export", "--out", "out/w.png"),
    ("export", "--ckpt", "notackpt.pt", "--out", "out/w.pt"),
    ("nosuchcommand",),
] + ([] if CUDA else [("sample", "--device", "cuda"), ("train", "--device", "cuda", "--run-dir", "newrun")])


def in_process(args, cwd):
    """main() in this interpreter, as the CLI would run it: exit code, stdout, stderr.
    Starting a fresh interpreter costs a second or two of imports per command line."""
    import contextlib
    import io
    import types
    out, err, code = io.StringIO(), io.StringIO(), 0
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            dm.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(old)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_bad_command_lines_exit_2_with_one_line_and_change_nothing(workdir):
    """The first bad line of each subcommand goes through the real CLI in a fresh
    interpreter; the rest run main() in this one, with the same checks."""
    assert len(BAD) >= 25
    before = snapshot(workdir)
    firsts = {args[0]: args for args in reversed(BAD)}.values()
    with ThreadPoolExecutor(max_workers=2) as pool:
        real = dict(zip(firsts, pool.map(lambda args: cli(*args, cwd=workdir), firsts)))
    results = [real[args] if args in real else in_process(args, workdir) for args in BAD]
    for args, r in zip(BAD, results):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (args, r.returncode, r.stderr[-500:])
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == "", (args, r.stdout)
    assert snapshot(workdir) == before
    assert not (workdir / "newrun").exists() and not (workdir / "empty" / "MNIST").exists()
    messages = {" ".join(a): r.stderr for a, r in zip(BAD, results)}
    # each message names the flag at fault
    for flag in ("--sampler", "--steps", "--eta", "--n", "--batch-size", "--device", "--out", "--ckpt",
                 "--epochs", "--lr", "--channels", "--ema-decay", "--run-dir", "--data-dir", "--samples"):
        assert any(flag in m for k, m in messages.items() if flag in k), flag
    assert "empty/MNIST/raw" in messages["train --data-dir empty --run-dir newrun"]


def test_help_explains_every_subcommand(capsys):
    for cmd in ([], ["train"], ["sample"], ["evaluate"], ["compare"], ["bench"], ["forward"], ["export"]):
        with pytest.raises(SystemExit) as e:
            dm.main(cmd + ["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "default" in text or not cmd, cmd
        if not cmd:
            for name in ("train", "sample", "evaluate", "compare", "bench", "forward", "export"):
                assert name in text
