"""Precision by card and several processes through torchrun, all on the CPU."""
import math
import subprocess
import sys

import pytest
import torch

import ddpm_mnist as dm
from conftest import ROOT, TINY_ARGS

TINY = (8, 8, 16, 16)


@pytest.mark.parametrize("cc, want", [((6, 1), None), ((7, 0), torch.float16), ((7, 5), torch.float16),
                                      ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_by_compute_capability(monkeypatch, cc, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    dtype, why = dm.choose_precision(torch.device("cuda"), "auto")
    assert dtype == want and f"{cc[0]}.{cc[1]}" in why


def test_auto_precision_on_mps_and_cpu(monkeypatch):
    assert dm.choose_precision(torch.device("mps"), "auto")[0] is None
    monkeypatch.setattr(dm, "cpu_has_bf16", lambda: True)
    assert dm.choose_precision(torch.device("cpu"), "auto")[0] == torch.bfloat16
    monkeypatch.setattr(dm, "cpu_has_bf16", lambda: False)
    assert dm.choose_precision(torch.device("cpu"), "auto")[0] is None
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)):
        assert dm.choose_precision(torch.device("cpu"), name)[0] == dtype


def fp16_steps(precision, steps, init_scale=2.0 ** 16):
    """A tiny run's first `steps` losses in a precision, with fp16's scaler as build_run makes it."""
    cfg = dm.RunConfig(channels=TINY, lr=1e-3, precision=precision, batch_size=16, epochs=steps)
    p, loss_fn = dm.build_run(cfg, torch.device("cpu"))
    if precision == "fp16":
        p.opt.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        loss_fn = dm.scale_loss(dm.diffusion_loss, p.opt.scaler)
    data = (torch.rand(16, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    losses = []
    dm.train(cfg, data, p, on_step=lambda step, loss, t, err: losses.append(loss.item()), loss_fn=loss_fn)
    return p, losses


def test_fp16_with_the_scaler_follows_fp32():
    """Five steps from the same weights and draws: fp16 autocast losses within 2% of fp32
    (fp16 keeps 11 bits of mantissa), and the scaler really scaled."""
    runs = {precision: fp16_steps(precision, 5)[1] for precision in ("fp32", "fp16")}
    p, _ = fp16_steps("fp16", 1)
    assert isinstance(p.opt, dm.ScaledOptimizer) and p.opt.scaler.is_enabled() and p.opt.scaler.get_scale() > 1
    for a, b in zip(runs["fp32"], runs["fp16"]):
        assert abs(a - b) < 0.02 * a, runs
    assert runs["fp32"] != runs["fp16"]


def test_a_skipped_scaler_step_changes_nothing_and_does_not_stop_training(mnist_dir, tmp_path):
    """A scale of 2^120 overflows the fp16 gradients: the scaler skips that step (the weights
    stay) and halves the scale; the loss itself is finite, so the NaN stop must not fire."""
    torch.manual_seed(0)
    before = [w.clone() for w in dm.UNet(TINY).parameters()]
    p, losses = fp16_steps("fp16", 1, init_scale=2.0 ** 120)
    assert all(map(math.isfinite, losses)) and p.opt.scaler.get_scale() == 2.0 ** 119
    assert all(torch.equal(a, b) for a, b in zip(before, p.model.parameters()))
    # a whole run in fp16 on the CPU: every step that overflows is skipped, training goes on
    run = tmp_path / "fp16"
    dm.main(["train", *TINY_ARGS, "--grid-n", "0", "--max-steps", "3", "--precision", "fp16",
             "--data-dir", str(mnist_dir), "--run-dir", str(run)])
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3 and ck["scaler"]["scale"] > 0 and ck["config"]["precision"] == "fp16"


def torchrun(*args, nproc=2, timeout=240):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(ROOT / "ddpm_mnist.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_two_processes_train_like_one_and_resume_under_one(mnist_dir, tmp_path, capsys):
    args = ["train", *TINY_ARGS, "--grid-n", "4", "--epochs", "3", "--precision", "fp32",
            "--data-dir", mnist_dir]
    r = torchrun(*args, "--run-dir", tmp_path / "two", "--max-steps", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("saved ") == 1                       # process 0 alone speaks
    dm.main([str(a) for a in args] + ["--run-dir", str(tmp_path / "one"), "--max-steps", "20"])
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("one", "two"))
    assert a["step"] == b["step"] == 20
    # The same steps up to the order of float sums across processes. Adam turns the tiny
    # gradients of a few biases into full-size steps whose sign that order can flip, so the
    # test compares the whole update: the two runs differ by under 1% of how far they moved.
    torch.manual_seed(0)
    init = dm.UNet(TINY).state_dict()
    flat = lambda ck: torch.cat([(ck["model"][k] - init[k]).flatten() for k in init])
    moved, apart = flat(a).norm(), (flat(b) - flat(a)).norm()
    assert apart < 0.01 * moved, (apart, moved)
    la, lb = ((tmp_path / r / "loss.csv").read_text().splitlines() for r in ("one", "two"))
    assert len(la) == len(lb) == 3 and sorted(p.name for p in (tmp_path / "two").glob("grid*")) == \
        ["grid_epoch001.png", "grid_epoch002.png"]
    for x, y in zip(la[1:], lb[1:]):
        assert abs(float(x.split(",")[2]) - float(y.split(",")[2])) < 1e-4     # the same mean loss
    # a 2-process checkpoint resumes in one process
    dm.main(["train", "--run-dir", str(tmp_path / "two"), "--resume", "--data-dir", str(mnist_dir),
             "--device", "cpu"])
    assert torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["step"] == 24


def test_bad_input_under_torchrun_stops_every_process_with_one_line(mnist_dir, tmp_path):
    """Each process checks before joining the group, so none is left waiting. torchrun
    stops the others at the first failure (and prints its own report), so a process may
    be ended before it prints: at least one line, and all of ours the same one line."""
    r = torchrun("train", *TINY_ARGS, "--batch-size", "33", "--run-dir", tmp_path / "x", "--data-dir", mnist_dir,
                 timeout=120)
    ours = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode != 0 and 1 <= len(ours) <= 2 and len(set(ours)) == 1, r.stderr[-2000:]
    assert ours[0].startswith("error: --batch-size 33: ") and "exitcode  : 2" in r.stderr
    assert not (tmp_path / "x").exists()


def test_more_processes_than_cards_is_refused_before_joining(monkeypatch):
    """What each of 4 torchrun processes on a 2-card machine checks first."""
    import argparse
    for k, v in dict(WORLD_SIZE="4", LOCAL_WORLD_SIZE="4", RANK="0", LOCAL_RANK="0", MASTER_ADDR="localhost",
                 MASTER_PORT="29500", TORCHELASTIC_RUN_ID="x").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = argparse.Namespace(device="cuda", data_dir="data")
    with pytest.raises(dm.UserError, match="--device cuda: 4 processes on this machine but 2 visible"):
        dm.start_processes(args, dm.RunConfig())
    with pytest.raises(dm.UserError, match="--batch-size 126: must divide evenly over the 4"):
        dm.start_processes(args, dm.RunConfig(batch_size=126))


def test_the_one_minute_limit_is_for_joining_and_collectives_wait_as_long_as_torchs_default(monkeypatch):
    """torchrun's group joins within a minute, and then its timeout is GROUP_TIMEOUT, 30
    minutes: every collective keeps the group's timeout, and the others wait in one while
    process 0 writes a checkpoint or draws a grid. One process, gloo, on this machine."""
    from datetime import timedelta
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    dm.join_group(torch.device("cpu"), 0, 1)
    try:
        group = torch.distributed.distributed_c10d._get_default_group()
        timeout = group._get_backend(torch.device("cpu")).options._timeout
        assert timeout == timedelta(minutes=30) == dm.GROUP_TIMEOUT
    finally:
        torch.distributed.destroy_process_group()
