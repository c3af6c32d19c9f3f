"""Nothing of the user's is overwritten, and every file read is checked before use: each case a
command line, or a crafted file, and the one line it must get (exit 2, no traceback, no file
changed). In-process, through main(), with the checks a fresh interpreter would run."""
import argparse
import os
import shutil

import numpy as np
import pytest
import torch

import ddpm_mnist as dm
from conftest import cli, make_mnist, write_idx
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
    # the classes of a later hunt: files not the program's, crafted state, data sets, links
    (h / "mine").mkdir()
    (h / "mine" / "config.json").write_text("{}")                    # the user's own, no run
    torch.save({k: v for k, v in ck.items()}, h / "legacy.pt", _use_new_zipfile_serialization=False)
    (h / "ro.png").write_bytes(b"\x89PNG")
    (h / "ro.png").chmod(0o444)
    os.mkfifo(h / "pipe.pt")
    os.symlink(h / "loop.pt", h / "loop.pt")
    os.symlink(h / "loop.png", h / "loop.png")
    crafted("nan.pt", lambda c: c["ema"].__setitem__("stem.bias", c["ema"]["stem.bias"] * float("nan")))
    crafted("cfg_beta_T_1.0.pt", lambda c: c["config"].__setitem__("beta_T", 1.0))
    crafted("cfg_T_10.pt", lambda c: c["config"].__setitem__("T", 10))
    crafted("cfg_lr_huge.pt", lambda c: c["config"].__setitem__("lr", 10 ** 400))
    crafted("fp8.pt", lambda c: c.__setitem__("ema", {k: v.to(torch.float8_e4m3fn) for k, v in c["ema"].items()}))
    crafted("sparse.pt", lambda c: c["ema"].__setitem__("stem.bias", c["ema"]["stem.bias"].to_sparse()))
    clf = torch.load(classifier, weights_only=True)
    torch.save(dict(clf, test_sigma=clf["test_sigma"] * float("nan")), h / "clf_nan.pt")
    import zipfile
    with zipfile.ZipFile(h / "text.npz", "w") as z:                  # a zip, but no .npy in it
        z.writestr("readme.txt", "not an array")

    def misshape_moment(c):
        c["opt"] = {"state": {i: dict(v) for i, v in c["opt"]["state"].items()},
                    "param_groups": c["opt"]["param_groups"]}
        c["opt"]["state"][0]["exp_avg"] = torch.zeros(3)
    for name, change in [("expavg", misshape_moment),
                         ("bins", lambda c: c.__setitem__("bin_loss_sums", "abc")),
                         ("histrow", lambda c: c.__setitem__("history", [{"epoch": "one"}])),
                         ("cuda", lambda c: c.__setitem__("device", "cuda (NVIDIA H100 80GB HBM3)")),
                         ("bigsec", lambda c: c.__setitem__("seconds", 10 ** 400)),
                         ("eps", lambda c: c["opt"].__setitem__("param_groups",
                                                                [dict(c["opt"]["param_groups"][0], eps="x")])),
                         ("scaler", lambda c: c.__setitem__("scaler", {"scale": "x"})),
                         ("betas", lambda c: c["opt"].__setitem__("param_groups",
                                                                  [dict(c["opt"]["param_groups"][0], betas=[0.9])]))]:
        (h / f"run_{name}").mkdir()
        crafted(f"run_{name}/ckpt.pt", change)
    make_mnist(h / "data_small", n_train=128)
    make_mnist(h / "data_five", n_train=5)
    for name, images, labels in [("data_32px", torch.zeros(64, 32, 32, dtype=torch.uint8), torch.zeros(64)),
                                 ("data_fewlabels", torch.zeros(64, 28, 28, dtype=torch.uint8), torch.zeros(60)),
                                 ("data_label12", torch.zeros(64, 28, 28, dtype=torch.uint8), torch.full((64,), 12))]:
        make_mnist(h / name)
        write_idx(h / name / "MNIST" / "raw" / "train-images-idx3-ubyte", images)
        write_idx(h / name / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels.to(torch.uint8))
    return h


CASES = [  # (command line, words the one line must hold)
    # one rule for every file written: the suffix of what it writes, never an input, never a training checkpoint
    ("evaluate --ckpt a/ckpt.pt --out a/ckpt.pt", "--out"),
    ("evaluate --samples s.npz --out s.npz", "--out s.npz: must end in .json"),
    ("evaluate --samples s.npz --steps 20", "--steps: with --samples nothing is sampled"),
    ("evaluate --samples s.npz --cuda-graph", "--cuda-graph: with --samples nothing is sampled"),
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
    # the operating system's refusals: one line naming the path and the reason
    ("sample --ckpt a/ckpt.pt --out " + "a" * 300 + ".png", "File name too long"),
    ("sample --ckpt loop.pt --out out/s.png", "--ckpt loop.pt"),
    ("sample --ckpt a/ckpt.pt --out loop.png", "--out loop.png: is a link that leads nowhere"),
    ("sample --ckpt pipe.pt --out out/s.png", "--ckpt pipe.pt: is not a regular file"),
    # files that are not the program's, or cannot be read to tell, are never replaced
    ("train --run-dir mine --data-dir data", "--run-dir mine: holds files but no checkpoint"),
    ("export --ckpt a/ckpt.pt --out legacy.pt", "--out legacy.pt: cannot be read to tell"),
    ("sample --ckpt a/ckpt.pt --out ro.png", "--out ro.png: is a read-only file"),
    # crafted state, weights and configs: checked before any work
    ("train --run-dir run_expavg --resume --epochs 3 --data-dir data", "optimizer exp_avg of parameter 0"),
    ("train --run-dir run_bins --resume --epochs 3 --data-dir data", "bin_loss_sums"),
    ("train --run-dir run_histrow --resume --epochs 3 --data-dir data", "seconds or history"),
    ("train --run-dir run_cuda --resume --epochs 3 --data-dir data", "resume it with --device cuda"),
    ("train --run-dir run_bigsec --resume --epochs 3 --data-dir data", "seconds or history"),
    ("train --run-dir run_eps --resume --epochs 3 --data-dir data", "optimizer eps 'x'"),
    ("train --run-dir run_scaler --resume --epochs 3 --data-dir data", "(ValueError: scaler)"),
    ("train --run-dir run_betas --resume --epochs 3 --data-dir data", "optimizer betas [0.9]"),
    ("sample --ckpt cfg_lr_huge.pt --out out/s.png", "config lr"),
    ("sample --ckpt fp8.pt --out out/s.png", "--ckpt: its weights do not fit"),
    ("sample --ckpt sparse.pt --out out/s.png", "--ckpt: its weights do not fit"),
    ("evaluate --samples s.npz --classifier clf_nan.pt", "--classifier clf_nan.pt: not an evaluation"),
    ("evaluate --samples text.npz --classifier clf.pt", "--samples text.npz: not a readable .npz"),
    ("sample --ckpt nan.pt --out out/s.png", "--ckpt: 1 of its weight tensors hold NaN"),
    ("sample --ckpt cfg_beta_T_1.0.pt --out out/s.png", "config beta_T 1.0: need a number above 0 and at most 0.999"),
    ("sample --ckpt cfg_T_10.pt --out out/s.png", "--steps 50: this model has T=10 timesteps"),
    # data sets: the size the network takes, one label 0..9 per image, enough to score with
    ("train --run-dir a --resume --epochs 3 --data-dir data_small", "resume it on its own data"),
    ("train --run-dir new --data-dir data_32px", "images are (64, 32, 32); the network takes (N, 28, 28)"),
    ("train --run-dir new --data-dir data_fewlabels", "60 labels for 64 images"),
    ("train --run-dir new --data-dir data_label12", "each must be 0..9"),
    ("evaluate --samples s.npz --data-dir data_five --classifier new.pt", "5 training images cannot train"),
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
    (dict(WORLD_SIZE="2", RANK="5", MASTER_ADDR="localhost"), "torchrun"),
    (dict(WORLD_SIZE="0", RANK="0", TORCHELASTIC_RUN_ID="x", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
          MASTER_ADDR="localhost", MASTER_PORT="29511"), "RANK below WORLD_SIZE"),
    (dict(WORLD_SIZE="2", RANK="x", TORCHELASTIC_RUN_ID="x", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
          MASTER_ADDR="localhost", MASTER_PORT="29511"), "RANK='x'"),
    (dict(WORLD_SIZE="2", RANK="0", TORCHELASTIC_RUN_ID="x", LOCAL_RANK="3", LOCAL_WORLD_SIZE="2",
          MASTER_ADDR="localhost", MASTER_PORT="29511"), "LOCAL_RANK below LOCAL_WORLD_SIZE")])
def test_torchrun_variables_set_by_hand_are_one_line_not_a_wait(home, monkeypatch, env, words):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
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


def test_the_checkpoint_of_an_epoch_is_written_before_its_grid(mnist_dir, tmp_path, monkeypatch, capsys):
    """A grid that fails (here: its picture cannot be written) loses no training; the run stops
    with exit code 1 and one line naming its last checkpoint."""
    def no_grids(*args):
        raise OSError(28, "No space left on device", "grid_epoch001.png")
    monkeypatch.setattr(dm, "epoch_grid", no_grids)
    with pytest.raises(SystemExit) as e:
        dm.main(["train", "--channels", "8,8,16,16", "--batch-size", "32", "--epochs", "2", "--device", "cpu",
                 "--data-dir", str(mnist_dir), "--run-dir", str(tmp_path / "r")])
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 8       # epoch 1 was saved
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and "the last good checkpoint is" in err


def test_torchrun_started_by_hand_without_its_rank_is_one_line(home, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    r = in_process(["train", "--run-dir", "new", "--data-dir", "data", "--device", "cpu"], home)
    assert r.returncode == 2 and "without RANK" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (home / "new").exists()


def test_an_npz_is_measured_before_it_is_decompressed(home, monkeypatch):
    monkeypatch.setattr(dm, "NPZ_LIMIT", 1000)          # s.npz holds 4 x 784 bytes
    r = in_process(["evaluate", "--samples", "s.npz", "--classifier", "clf.pt", "--out", "out/e.json"], home)
    assert r.returncode == 2 and "refused unread" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_run_folder_is_locked_while_a_train_runs_in_it(home):
    import fcntl
    fd = os.open(home / "b", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # as a running train holds it
    try:
        before = snapshot(home)
        r = in_process(["train", "--run-dir", "b", "--resume", "--epochs", "3", "--data-dir", "data",
                        "--device", "cpu"], home)
        assert r.returncode == 2 and "another train is running in it" in r.stderr, r.stderr
        assert snapshot(home) == before
    finally:
        os.close(fd)


def test_overwrite_removes_the_runs_own_files_and_nothing_else(mnist_dir, tmp_path):
    run = tmp_path / "r"
    args = ["train", "--channels", "8,8,16,16", "--batch-size", "32", "--grid-n", "4", "--device", "cpu",
            "--data-dir", str(mnist_dir), "--run-dir", str(run)]
    dm.main([*args, "--epochs", "2"])
    mine = ["notes.txt", ".thesis.tmp", "grid_epoch_mine_final.png", "grid_epoch_photos.png"]
    for name in mine[:3]:
        (run / name).write_text("mine")
    (run / mine[3]).mkdir()                                  # a folder named like a grid
    import subprocess, sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()                  # a process now ended
    (run / f".ckpt.pt.{dm.HOST}-{dead}.ddpm_mnist.tmp").write_text("a killed write's")
    mine += [f".ckpt.pt.{dm.HOST}-1.ddpm_mnist.tmp", "x.ddpm_mnist.tmp", "grid_epoch\u0661.png"]
    for name in mine[4:]:                                    # a live process's; look-alikes
        (run / name).write_text("mine")
    dm.main([*args, "--epochs", "1", "--overwrite"])
    assert sorted(f.name for f in run.iterdir()) == sorted(["ckpt.pt", "config.json", "grid_epoch001.png",
                                                            "loss.csv", *mine])
    assert len((run / "loss.csv").read_text().splitlines()) == 2


def test_seeds_combine_without_overflow_and_keep_the_order_they_had():
    big = dm.epoch_batches(64, 8, 2 ** 63 - 1, 3)                       # the largest --seed
    assert sorted(big.flatten().tolist()) == list(range(64))
    want = torch.randperm(64, generator=torch.Generator().manual_seed(5 * 1_000_003 + 2))
    assert torch.equal(dm.epoch_batches(64, 8, 5, 2).flatten(), want)   # as before for seed 5


def test_a_grid_out_of_memory_blames_grid_n_keeps_the_checkpoint_and_resumes_without_it(mnist_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(dm, "epoch_grid", no_memory)
    run = tmp_path / "r"
    args = ["--data-dir", str(mnist_dir), "--run-dir", str(run), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        dm.main(["train", "--channels", "8,8,16,16", "--batch-size", "32", "--epochs", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and err.startswith("error: --grid-n:") and "(step 8)" in err, err
    dm.main(["train", "--resume", "--grid-n", "0", *args])          # the grid is a picture, not the model
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 16


def test_a_crafted_training_record_is_not_stated_and_breaks_nothing(tiny_run, tmp_path, capsys):
    """How long a model trained is only a note: an export's record that is not numbers, or a
    run's steps per epoch of 0, is said to be unrecorded (or falls back), with no traceback."""
    ck = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    torch.save(dict(ck, steps_per_epoch=0), tmp_path / "spe0.pt")
    dm.main(["export", "--ckpt", str(tmp_path / "spe0.pt"), "--out", str(tmp_path / "e.pt")])
    assert "trained 16 steps" in capsys.readouterr().out
    e = torch.load(tmp_path / "e.pt", weights_only=True)
    torch.save(dict(e, trained=dict(step="abc", epochs=None, device=7)), tmp_path / "bad.pt")
    dm.main(["export", "--ckpt", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "e2.pt")])
    assert "its training length is not recorded in the file" in capsys.readouterr().out


def test_evaluate_refuses_a_bad_classifier_or_missing_test_digits_before_sampling(home, tmp_path,
                                                                                   monkeypatch, capsys):
    """What can fail is checked before minutes of sampling: here sampling itself fails the test."""
    def no_sampling(*args, **kw):
        raise AssertionError("sampled before checking")
    monkeypatch.setattr(dm, "generate", no_sampling)
    monkeypatch.chdir(home)
    raw = tmp_path / "notest" / "MNIST" / "raw"              # training digits, no test digits
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(home / "data" / "MNIST" / "raw" / f, raw / f)
    for extra, words in ((["--classifier", "clf_dict.pt"], "--classifier clf_dict.pt"),
                         (["--data-dir", str(tmp_path / "notest")], "--data-dir")):
        with pytest.raises(SystemExit) as e:
            dm.main(["evaluate", "--ckpt", "a/ckpt.pt", "--device", "cpu", "--out", "out/e.json",
                     *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1, err


def test_an_empty_run_dir_is_named_not_taken_for_the_current_folder(home):
    r = in_process(["train", "--run-dir", "", "--data-dir", "data", "--device", "cpu", "--overwrite"], home)
    assert r.returncode == 2 and r.stderr.strip() == "error: --run-dir: empty; name the run's folder"


OVER_A_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
sys.path.insert(0, sys.argv[1])
import ddpm_mnist
ddpm_mnist.main(sys.argv[2:])
"""


@pytest.mark.parametrize("command, code", [("export", 2), ("train", 1), ("sample", 2)])
def test_a_write_the_system_refuses_is_one_line_naming_the_file(tiny_run, mnist_dir, tmp_path, command, code):
    """Files may not exceed 60 kB here (RLIMIT_FSIZE, as a full disk or a quota refuses a write):
    torch.save's own error for it, and numpy's and PIL's, become one line naming the file, no
    temporary or half-written file stays; a run under way ends with exit code 1."""
    import subprocess, sys
    out = tmp_path / "out"
    out.mkdir()
    ckpt = str(tiny_run / "ckpt.pt")
    argv = {"export": ["export", "--ckpt", ckpt, "--out", str(out / "e.pt")],
            "sample": ["sample", "--ckpt", ckpt, "--n", "2000", "--steps", "1", "--format", "npz",
                       "--out", str(out / "s.npz"), "--device", "cpu"],
            "train": ["train", "--channels", "8,8,16,16", "--batch-size", "32", "--epochs", "1",
                      "--grid-n", "0", "--data-dir", str(mnist_dir), "--run-dir", str(out / "run"),
                      "--device", "cpu"]}[command]
    r = subprocess.run([sys.executable, "-c", OVER_A_LIMIT, os.path.dirname(dm.__file__), *argv],
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr[-600:]
    assert "File too large" in lines[-1] and str(out) in lines[-1], lines[-1]
    left = sorted(p.name for p in out.rglob("*"))
    assert left == (["config.json", "run"] if command == "train" else []), left


def test_torchs_warnings_about_a_crafted_file_stay_off_the_one_line(home):
    """A sparse tensor makes torch.load warn on stderr; the user still sees one line."""
    r = cli("sample", "--ckpt", "sparse.pt", "--out", "out/s.png", "--device", "cpu", cwd=home)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "its weights do not fit" in r.stderr


def test_small_inputs_are_stated_as_they_are(tmp_path, capsys):
    """forward draws as many digits as the data set has and says so; a device index must be
    ASCII digits ('cuda:²' passes str.isdigit but not int)."""
    make_mnist(tmp_path / "four", n_train=4)
    dm.main(["forward", "--data-dir", str(tmp_path / "four"), "--n", "16", "--out", str(tmp_path / "f.png")])
    assert "wrote" in (out := capsys.readouterr().out) and ": 4 digits at t" in out
    for bad in ("cuda:²", "cuda:０", "cuda:"):
        with pytest.raises(argparse.ArgumentTypeError):
            dm.device_arg(bad)
    assert dm.device_arg("cuda:1") == "cuda:1"


def test_names_and_links_the_system_takes_are_written(tiny_run, tmp_path):
    """A name of 244 bytes (80 CJK characters and .png) fits the system's 255, so its temporary
    name must too; a png-dir --out that is a link to an empty folder fills that folder."""
    base = ["sample", "--ckpt", str(tiny_run / "ckpt.pt"), "--n", "2", "--steps", "2", "--device", "cpu"]
    long_name = tmp_path / ("\u6570" * 80 + ".png")
    dm.main(base + ["--out", str(long_name)])
    assert long_name.exists() and sorted(p.name for p in tmp_path.iterdir()) == [long_name.name]
    (tmp_path / "pngs").mkdir()
    os.symlink(tmp_path / "pngs", tmp_path / "link")
    dm.main(base + ["--format", "png-dir", "--out", str(tmp_path / "link")])
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["000000.png", "000001.png"]
    assert (tmp_path / "link").is_symlink()
