"""Never lose a run: exact resume after SIGKILL, Ctrl-C, atomic files, safe loading,
numerical faults."""
import signal
import subprocess
import sys
import time

import pytest
import torch

import ddpm_mnist as dm
from conftest import ROOT, TINY_ARGS, cli


def same_weights(a, b):
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"]
    for part in ("model", "ema"):
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    return ca


def test_sigkill_then_resume_gives_bitwise_the_same_weights(mnist_dir, tmp_path):
    args = ["train", *TINY_ARGS, "--grid-n", "0", "--epochs", "3", "--data-dir", mnist_dir]
    ref = tmp_path / "ref"
    assert cli(*args, "--run-dir", ref).returncode == 0
    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(ROOT / "ddpm_mnist.py"), *map(str, args), "--run-dir", str(run),
                          "--ckpt-every", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "ckpt.pt"
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert killed_at < 24, "the run finished before it was killed; nothing was tested"
    r = cli("train", "--run-dir", run, "--resume", "--data-dir", mnist_dir, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ck = same_weights(ref / "ckpt.pt", ckpt)
    assert ck["step"] == 24
    for name, v in torch.load(ref / "ckpt.pt", weights_only=True)["opt"]["state"].items():
        assert torch.equal(v["exp_avg"], ck["opt"]["state"][name]["exp_avg"])
    assert (ref / "loss.csv").read_text().splitlines()[1:][0].split(",")[:3] == \
        (run / "loss.csv").read_text().splitlines()[1:][0].split(",")[:3]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_and_exits_128_plus_the_signal(mnist_dir, tmp_path, sig, code):
    """Ctrl-C, and SIGTERM as kill, timeout, Slurm and docker stop send it: the step finishes,
    the checkpoint is saved, and the line to resume names the run folder and the data."""
    run = tmp_path / "r"
    p = subprocess.Popen([sys.executable, str(ROOT / "ddpm_mnist.py"), "train", *TINY_ARGS, "--grid-n", "0",
                          "--epochs", "50", "--data-dir", str(mnist_dir), "--run-dir", str(run), "--ckpt-every", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "--resume" in err and f"--data-dir {mnist_dir}" in err and "Traceback" not in err
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert 0 < step < 400


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))      # creates a file if ever unpickled


def test_a_checkpoint_carrying_code_is_refused_and_nothing_runs(tmp_path, tiny_run):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    ck = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    ck["payload"] = Evil(str(marker))
    torch.save(ck, bad)
    assert not marker.exists()
    with pytest.raises(dm.UserError, match="refused"):
        dm.load_checkpoint(bad)
    r = cli("sample", "--ckpt", bad, "--out", tmp_path / "x.png", "--device", "cpu")
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists() and not (tmp_path / "x.png").exists()


def test_truncated_foreign_and_mismatched_checkpoints_get_one_clear_line(tmp_path, tiny_run):
    data = (tiny_run / "ckpt.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    ck = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    ck["config"]["channels"] = (16, 16, 32, 32)
    torch.save(ck, tmp_path / "mismatch.pt")
    for name, words in (("trunc.pt", "not a readable checkpoint"), ("foreign.pt", "not a ddpm_mnist checkpoint"),
                        ("mismatch.pt", "do not fit")):
        with pytest.raises(dm.UserError, match=words) as e:
            dm.model_from_checkpoint(dm.load_checkpoint(tmp_path / name))
        assert "\n" not in str(e.value)


def test_an_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_run):
    path = tmp_path / "ckpt.pt"
    path.write_bytes((tiny_run / "ckpt.pt").read_bytes())

    def half_then_die(f):
        f.write(b"PK\x03\x04 partial checkpoint")
        raise KeyboardInterrupt                      # the process dies mid-write

    with pytest.raises(KeyboardInterrupt):
        dm.atomic_write(path, half_then_die)
    model, _ = dm.model_from_checkpoint(dm.load_checkpoint(path))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]       # no temp file left over


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(mnist_dir, tmp_path, capsys):
    run = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        dm.main(["train", *TINY_ARGS, "--grid-n", "0", "--lr", "1e30", "--ckpt-every", "1",
                 "--data-dir", str(mnist_dir), "--run-dir", str(run)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "NaN or infinite at step" in err and str(run / "ckpt.pt") in err and "--lr" in err
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    bad_step = int(err.split("at step ")[1].split(";")[0])
    assert ck["step"] == bad_step - 1


def test_temporary_files_of_killed_writes_are_removed_by_the_next_write(tiny_run, tmp_path):
    """A write killed mid-way leaves .NAME.HOST-PID.ddpm_mnist.tmp beside NAME. The next write
    into that folder removes it, since its process is gone; a running process's temporary file,
    another machine's and the user's own files stay."""
    import os
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                             capture_output=True, text=True).stdout)     # a process now ended
    out = tmp_path / "out"
    out.mkdir()
    temp = lambda name, host, pid: out / f".{name}.{host}-{pid}.ddpm_mnist.tmp"
    stale = [temp("s.png", dm.HOST, pid), temp("ckpt.pt", dm.HOST, pid)]
    kept = [temp("s.png", dm.HOST, os.getppid()),          # a process that runs
            temp("s.png", "another-host", pid),            # another machine's, sharing the folder
            out / ".notes.tmp", out / f".todo.txt.{pid}.tmp"]
    for f in stale + kept:
        f.write_bytes(b"half")
    dm.main(["sample", "--ckpt", str(tiny_run / "ckpt.pt"), "--n", "2", "--steps", "2",
             "--device", "cpu", "--out", str(out / "s.png")])
    assert not any(f.exists() for f in stale)
    assert all(f.read_bytes() == b"half" for f in kept)
    assert sorted(f.name for f in out.iterdir()) == sorted([f.name for f in kept] + ["s.png"])
