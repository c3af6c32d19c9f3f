"""The fast paths compute what the plain step computes: the compiled step (with aot_eager, the
same graphs without generated code), the static-buffer step that a CUDA graph replays, a failed
capture falling back, and bench's modes side by side. All on the CPU."""
import re
import numpy as np
import pytest
import torch

import ddpm_mnist as dm
from conftest import TINY_ARGS

TINY = (8, 8, 16, 16)


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(dm, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def moved_apart(a, b):
    """How far two runs' weights ended apart, against how far the first moved from its start.
    Adam turns the tiniest gradients into full-size steps whose sign float rounding can flip, so
    weights are compared as a whole, not one by one."""
    torch.manual_seed(0)
    init = dm.UNet(TINY).state_dict()
    flat = lambda ck: torch.cat([(ck["model"][k] - init[k]).flatten() for k in init])
    return ((flat(b) - flat(a)).norm() / flat(a).norm()).item()


def test_compiled_training_follows_eager_with_no_graph_break_or_recompile(mnist_dir, tmp_path, aot_eager,
                                                                          monkeypatch):
    """Two epochs eager; the same compiled, cut in the second epoch and resumed. fullgraph=True
    fails on any graph break, error_on_recompile on any recompile within a process."""
    args = [*TINY_ARGS, "--grid-n", "0", "--epochs", "2", "--precision", "fp32", "--data-dir", str(mnist_dir)]
    dm.main(["train", *args, "--run-dir", str(tmp_path / "eager")])
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    dm.main(["train", *args, "--compile", "--max-steps", "11", "--run-dir", str(tmp_path / "compiled")])
    torch._dynamo.reset()                             # a resumed run is a new process: it compiles afresh
    dm.main(["train", "--resume", "--compile", "--data-dir", str(mnist_dir), "--device", "cpu",
             "--run-dir", str(tmp_path / "compiled")])
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("eager", "compiled"))
    assert a["step"] == b["step"] == 16
    assert moved_apart(a, b) < 0.01
    for x, y in zip(a["history"], b["history"]):
        assert x["mean_loss"] == pytest.approx(y["mean_loss"], rel=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_static_step_a_graph_replays_is_part_ones_step_bitwise(precision):
    """Three epochs of Part I's loop, and of static_step fed the same batch indices: the same
    weights and EMA bit for bit (the EMA's warm-up decay computed on the device in float64, the
    batch gathered by a device index). Both use the capturable AdamW with a device lr."""
    cfg = dm.RunConfig(channels=TINY, batch_size=16, epochs=3, lr=1e-3, ema_decay=0.99, precision=precision)
    data = (torch.rand(48, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    runs = []
    for static in (False, True):
        p, loss_fn = dm.build_run(cfg, torch.device("cpu"), graph=True)
        draw = dm.training_draw(cfg, data, None, p)
        if static:
            step_fn, n = dm.static_step(p, cfg, draw, loss_fn), torch.zeros((), dtype=torch.float64)
            for step in range(9):
                epoch, k = divmod(step, 3)
                order = dm.epoch_batches(len(data), 16, cfg.seed, epoch) if k == 0 else order
                step_fn(order[k], n.fill_(step))
        else:
            dm.train(cfg, data, p, draw=draw, loss_fn=loss_fn)
        runs.append(p)
    for part in ("model", "ema"):
        for x, y in zip(getattr(runs[0], part).parameters(), getattr(runs[1], part).parameters()):
            assert torch.equal(x, y), part
    assert isinstance(runs[1].opt.param_groups[0]["lr"], torch.Tensor) and runs[1].opt.param_groups[0]["capturable"]


class FakeStream:
    def wait_stream(self, other):
        pass


class CaptureFails:
    def __init__(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_is_one_line_and_training_goes_on(mnist_dir, tmp_path, monkeypatch, capsys):
    """--cuda-graph where capture fails (simulated on the CPU): one note, then the step runs
    uncaptured, and the run ends as the plain one does; the checkpoint resumes without graphs."""
    args = [*TINY_ARGS, "--grid-n", "0", "--epochs", "2", "--precision", "fp32", "--data-dir", str(mnist_dir)]
    dm.main(["train", *args, "--run-dir", str(tmp_path / "plain")])
    monkeypatch.setattr(dm, "graph_unsupported", lambda *a, **k: None)
    for name, fake in (("Stream", FakeStream), ("current_stream", FakeStream), ("CUDAGraph", CaptureFails),
                       ("stream", lambda s: __import__("contextlib").nullcontext())):
        monkeypatch.setattr(torch.cuda, name, fake)
    capsys.readouterr()
    dm.main(["train", *args, "--cuda-graph", "--max-steps", "12", "--run-dir", str(tmp_path / "graph")])
    err = capsys.readouterr()
    assert "step: eager and captured as a CUDA graph" in err.out
    notes = [l for l in err.err.splitlines() if "capture failed" in l]
    assert len(notes) == 1 and "RuntimeError" in notes[0] and "uncaptured" in notes[0]
    monkeypatch.undo()
    dm.main(["train", "--resume", "--data-dir", str(mnist_dir), "--device", "cpu", "--run-dir", str(tmp_path / "graph")])
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("plain", "graph"))
    assert a["step"] == b["step"] == 16 and moved_apart(a, b) < 0.01
    assert isinstance(b["opt"]["param_groups"][0]["lr"], float) and not b["opt"]["param_groups"][0]["capturable"]


def test_train_says_where_graphs_cannot_run_and_trains_plainly(mnist_dir, tmp_path, capsys):
    dm.main(["train", *TINY_ARGS, "--grid-n", "0", "--max-steps", "2", "--cuda-graph", "--data-dir", str(mnist_dir),
             "--run-dir", str(tmp_path / "r")])
    assert "step: eager (--cuda-graph: CUDA graphs need a CUDA device, not cpu)" in capsys.readouterr().out
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 2


def test_compiled_sampling_follows_the_plain_sampler(tiny_run, tmp_path, aot_eager):
    base = ["sample", "--ckpt", str(tiny_run / "ckpt.pt"), "--n", "4", "--steps", "4", "--eta", "1", "--format", "npz",
            "--precision", "fp32", "--device", "cpu"]
    dm.main(base + ["--out", str(tmp_path / "plain.npz")])
    dm.main(base + ["--out", str(tmp_path / "fast.npz"), "--compile", "--cuda-graph"])
    a, b = (np.load(tmp_path / f)["images"].astype(int) for f in ("plain.npz", "fast.npz"))
    assert np.abs(a - b).max() <= 1                   # within one grey level of 255


def test_bench_reports_each_mode_side_by_side(capsys, aot_eager):
    dm.main(["bench", "--channels", "8,8,16,16", "--batch-size", "4", "--reps", "2", "--device", "cpu",
             "--compile", "--cuda-graph"])
    out = capsys.readouterr().out
    rows = {l.split()[0]: l for l in out.splitlines() if re.match(r"(eager|compiled) +\d", l)}
    assert set(rows) == {"eager", "compiled"} and "compiled + graph  not possible: CUDA graphs need" in out
    for row in rows.values():
        warm, ms, img_s = (float(v.replace(",", "")) for v in row.split()[1:4] if v[0].isdigit())
        assert warm > 0 and ms > 0 and img_s > 0
    assert "warm-up s" in out and "DDPM-1000 s" in out
