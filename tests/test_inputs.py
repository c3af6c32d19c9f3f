"""Nothing of the user's is overwritten, and every file read is checked before use: each case a
command line, or a crafted file, and the one line it must get (exit 2, no traceback, no file
changed). In-process, through main(), with the checks a fresh interpreter would run."""
import os
import shutil

import numpy as np
import pytest
import torch

import ddpm_mnist as dm
from test_cli import in_process, snapshot


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_run, mnist_dir, classifier):
    """A user's folder: data, two runs with their training checkpoints, an export, samples, a
    classifier, and crafted files of every wrong kind."""
    h = tmp_path_factory.mktemp("home")
    os.symlink(mnist_dir, h / "data")
    for run in ("a", "b"):
        shutil.copytree(tiny_run, h / run)
    dm.main(["export", "--ckpt", str(h / "a" / "ckpt.pt"), "--out", str(h / "x.pt")])
    dm.main(["sample", "--ckpt", str(h / "a" / "ckpt.pt"), "--n", "4", "--steps", "2", "--format", "npz",
             "--out", str(h / "s.npz"), "--device", "cpu"])
    dm.main(["evaluate", "--samples", str(h / "s.npz"), "--data-dir", str(h / "data"), "--classifier",
             str(classifier), "--device", "cpu", "--out", str(h / "e.json")])
    shutil.copy(classifier, h / "clf.pt")
    ck = torch.load(tiny_run / "ckpt.pt", weights_only=True)

    def crafted(name, change):
        c = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ck.items()}
        change(c)
        torch.save(c, h / name)
    for key, value in [("channels", "64,128"), ("channels", 64), ("channels", None), ("dataset", "svhn"),
                       ("schedule", "quadratic"), ("T", "1000"), ("T", 0), ("num_classes", "10"), ("dropout", "0.1"),
                       ("channels", (1024 * 1024,) * 4), ("lr", -1.0)]:
        crafted(f"cfg_{key}_{value}.pt".replace(" ", ""), lambda c, k=key, v=value: c["config"].__setitem__(k, v))
    crafted("config_list.pt", lambda c: c.__setitem__("config", [1, 2]))
    crafted("misfit.pt", lambda c: c["config"].__setitem__("channels", (16, 16, 32, 32)))
    for name, key, value in [("rng", "rng", torch.zeros(7, dtype=torch.uint8)), ("step", "step", "16"),
                             ("opt", "opt", {"state": {}, "param_groups": []}), ("hist", "history", 3)]:
        (h / f"run_{name}").mkdir()
        crafted(f"run_{name}/ckpt.pt", lambda c, k=key, v=value: c.__setitem__(k, v))
    (h / "run_misfit").mkdir()
    crafted("run_misfit/ckpt.pt", lambda c: c.__setitem__("model", {"stem.weight": torch.zeros(3)}))
    torch.save({"model": {}}, h / "clf_dict.pt")
    torch.save(torch.zeros(3), h / "clf_tensor.pt")
    np.savez(h / "objects.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.array([1, "a", None, 2], object))
    np.savez(h / "labels_range.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.array([1, 2, 3, 11]))
    (h / "out").mkdir()
    return h


CASES = [  # (command line, words the one line must hold)
    # one rule for every file written: the suffix of what it writes, never an input, never a training checkpoint
    ("evaluate --ckpt a/ckpt.pt --out a/ckpt.pt", "--out"),
    ("evaluate --samples s.npz --out s.npz", "--out s.npz: must end in .json"),
    ("forward --data-dir data --out x.pt", "--out x.pt: must end in .png"),
    ("export --ckpt a/ckpt.pt --out b/ckpt.pt", "--out b/ckpt.pt: holds a run's training state"),
    ("export --ckpt a/ckpt.pt --out a/ckpt.pt", "--out a/ckpt.pt"),
    ("export --ckpt x.pt --out x.pt", "--out x.pt: is an input of this command"),
    ("sample --ckpt a/ckpt.pt --format npz --out s.png", "--out s.png: must end in .npz"),
    ("sample --ckpt a/ckpt.pt --out e.json", "--out e.json: must end in .png"),
    ("compare --ckpt a/ckpt.pt --classifier clf.pt --out clf.pt", "--out clf.pt"),
    ("evaluate --samples s.npz --classifier e.json", "--classifier e.json"),
    ("evaluate --samples s.npz --classifier s.npz", "--classifier s.npz"),
    ("sample --ckpt a/ckpt.pt --out .", "--out .: names no file"),
    ("evaluate --samples .", "--samples .: names a folder"),
    ("sample --ckpt / --out out/s.png", "--ckpt /: names a folder"),
    ("train --grid-n 1000000000000 --run-dir new", "--grid-n"),
    ("train --run-dir s.npz --data-dir data", "--run-dir s.npz: s.npz is a file"),          # the run folder a file
    ("train --run-dir e.json/run --data-dir data", "--run-dir e.json/run: e.json is a file"),   # or a folder above it
    # files read: checked before use
    ("evaluate --samples s.npz --classifier a/ckpt.pt", "--classifier a/ckpt.pt: not an evaluation classifier"),
    ("evaluate --samples s.npz --classifier clf_dict.pt", "--classifier clf_dict.pt: not an evaluation classifier"),
    ("evaluate --samples s.npz --classifier clf_tensor.pt", "--classifier clf_tensor.pt: not an evaluation classifier"),
    ("evaluate --samples objects.npz --classifier clf.pt", "--samples objects.npz: not a readable .npz"),
    ("evaluate --samples labels_range.npz --classifier clf.pt", "--samples labels_range.npz: its labels"),
    ("sample --ckpt cfg_channels_64,128.pt --out out/s.png", "config channels"),
    ("sample --ckpt cfg_channels_64.pt --out out/s.png", "config channels"),
    ("sample --ckpt cfg_channels_None.pt --out out/s.png", "config channels"),
    ("sample --ckpt cfg_dataset_svhn.pt --out out/s.png", "config dataset 'svhn'"),
    ("sample --ckpt cfg_schedule_quadratic.pt --out out/s.png", "config schedule 'quadratic'"),
    ("sample --ckpt cfg_T_1000.pt --out out/s.png", "config T '1000': need an integer"),
    ("sample --ckpt cfg_T_0.pt --out out/s.png", "config T 0: need an integer from 2"),
    ("sample --ckpt cfg_num_classes_10.pt --out out/s.png", "num_classes"),
    ("sample --ckpt cfg_dropout_0.1.pt --out out/s.png", "config dropout '0.1': need a number"),
    ("sample --ckpt cfg_channels_(1048576,1048576,1048576,1048576).pt --out out/s.png", "width 1048576: need an integer from 8 to 1024"),
    ("export --ckpt cfg_lr_-1.0.pt --out out/y.pt", "config lr -1.0"),
    ("sample --ckpt config_list.pt --out out/s.png", "not a ddpm_mnist checkpoint"),
    ("sample --ckpt misfit.pt --out out/s.png", "do not fit"),
    ("train --run-dir run_rng --resume --epochs 3 --data-dir data", "--resume: run_rng/ckpt.pt: its training state does not fit"),
    ("train --run-dir run_step --resume --epochs 3 --data-dir data", "--resume: run_step/ckpt.pt: its training state does not fit"),
    ("train --run-dir run_opt --resume --epochs 3 --data-dir data", "--resume: run_opt/ckpt.pt: its training state does not fit"),
    ("train --run-dir run_hist --resume --epochs 3 --data-dir data", "--resume: run_hist/ckpt.pt: its training state does not fit"),
    ("train --run-dir run_misfit --resume --epochs 3 --data-dir data", "--resume: run_misfit/ckpt.pt: its training state"),
    # flags: the bounds their help states
    ("train --min-snr-gamma 1e39 --run-dir new", "--min-snr-gamma: '1e39': need a number from 0 to 1000000.0"),
    ("train --seed 18446744073709551616 --run-dir new", "--seed"),
    ("sample --guidance 1e308", "--guidance"),
    ("sample --eta 1e300", "--eta: '1e300': need a number from 0 to 1"),
    ("train --channels 65536,65536,65536,65536 --run-dir new", "--channels"),
    ("sample --n 1000000000000", "--n"),
    ("train --batch-size 10000000 --run-dir new", "--batch-size"),
    ("train --lr inf --run-dir new", "--lr"),
]


def test_each_case_is_one_line_exit_2_and_changes_nothing(home):
    before = snapshot(home)
    for line, words in CASES:
        args = line.split()
        r = in_process(args + ["--device", "cpu"] * (args[0] in ("train", "sample", "evaluate", "compare")), home)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (line, r.stderr[-400:])
        assert words in lines[0], (line, lines[0])
        assert "Traceback" not in r.stderr and r.stdout == "", (line, r.stdout)
    assert snapshot(home) == before
    assert not (home / "new").exists()


@pytest.mark.parametrize("env, words", [
    (dict(WORLD_SIZE="2", RANK="0"), "WORLD_SIZE='2'"), (dict(WORLD_SIZE="0"), "WORLD_SIZE='0'"),
    (dict(WORLD_SIZE="-1"), "WORLD_SIZE='-1'"), (dict(WORLD_SIZE="abc"), "WORLD_SIZE='abc'"),
    (dict(WORLD_SIZE="2", RANK="5", MASTER_ADDR="localhost"), "torchrun")])
def test_torchrun_variables_set_by_hand_are_one_line_not_a_wait(home, monkeypatch, env, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    r = in_process(["train", "--run-dir", "new", "--data-dir", "data", "--device", "cpu"], home)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (home / "new").exists()


def test_every_command_refuses_an_out_that_is_one_of_its_inputs(home):
    """Each input of each command, given again as --out: refused, and the input unchanged."""
    before = snapshot(home)
    for line in ("sample --ckpt {f}", "evaluate --ckpt {f}", "evaluate --samples {f}", "compare --ckpt {f}",
                 "export --ckpt {f}"):
        for f in ("a/ckpt.pt", "x.pt", "s.npz", "e.json", "clf.pt"):
            r = in_process([*line.format(f=f).split(), "--out", f], home)
            assert r.returncode == 2 and "--out" in r.stderr, (line, f, r.stderr)
    for f in ("clf.pt",):
        r = in_process(["evaluate", "--samples", "s.npz", "--classifier", f, "--out", f], home)
        assert r.returncode == 2, r.stderr
    assert snapshot(home) == before


def test_the_checkpoint_of_an_epoch_is_written_before_its_grid(mnist_dir, tmp_path, monkeypatch):
    """A grid that fails (here: its picture cannot be written) loses no training."""
    def no_grids(*args):
        raise OSError("disk full")
    monkeypatch.setattr(dm, "epoch_grid", no_grids)
    with pytest.raises(OSError):
        dm.main(["train", "--channels", "8,8,16,16", "--batch-size", "32", "--epochs", "2", "--device", "cpu",
                 "--data-dir", str(mnist_dir), "--run-dir", str(tmp_path / "r")])
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 8       # epoch 1 was saved
