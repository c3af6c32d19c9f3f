"""The fast paths compute what the plain step computes: the compiled step (with aot_eager, the
same graphs without generated code), the CUDA-graph path through torch.compile, a compiler that
cannot run falling back, and bench's modes side by side. All on the CPU."""
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
def test_the_cuda_graph_path_is_part_ones_step_through_compile(precision, monkeypatch):
    """--cuda-graph is torch.compile's "reduce-overhead" mode (CUDA graphs need a GPU, so here
    torch.compile is a recorder that returns the function as it is). Three epochs of Part I's
    loop through that path give the same weights and EMA bit for bit as the plain loop; each
    step starts a new cudagraph step once; the outputs handed back are copies, since a replay
    writes over the graph's own."""
    cfg = dm.RunConfig(channels=TINY, batch_size=16, epochs=3, lr=1e-3, ema_decay=0.99, precision=precision)
    data = (torch.rand(48, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    asked, marks, raw = [], [], []

    def fake_compile(fn, **kw):
        asked.append(kw)

        def run(*args):
            raw.append(fn(*args))
            return raw[-1]
        return run
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    runs = []
    for graph in (False, True):
        p, loss_fn = dm.build_run(cfg, torch.device("cpu"), graph=graph)
        dm.train(cfg, data, p, draw=dm.training_draw(cfg, data, None, p), loss_fn=loss_fn)
        runs.append(p)
    assert len(asked) == 1 and asked[0]["mode"] == "reduce-overhead" and asked[0]["fullgraph"]
    assert len(marks) == len(raw) == 9
    for part in ("model", "ema"):
        for x, y in zip(getattr(runs[0], part).parameters(), getattr(runs[1], part).parameters()):
            assert torch.equal(x, y), part
    out = dm.compiled(lambda x: (x * 2, x + 1), graph=True)(torch.ones(3))
    assert all(o.data_ptr() != r.data_ptr() for o, r in zip(out, raw[-1]))
    assert torch.equal(out[0], torch.full((3,), 2.0)) and torch.equal(out[1], out[0])


def broken_backend(gm, example_inputs):
    """A compiler backend that fails as inductor does where its cache cannot be written."""
    raise OSError(30, "Read-only file system", "/cache/inductor")


def test_a_compiler_that_cannot_run_is_one_line_and_training_goes_on(mnist_dir, tmp_path, monkeypatch,
                                                                      capsys):
    """--compile where the compiler fails: one note naming why, then the step runs as it is and
    the run is the plain one bit for bit; sampling too."""
    args = [*TINY_ARGS, "--grid-n", "0", "--epochs", "2", "--precision", "fp32", "--data-dir", str(mnist_dir)]
    dm.main(["train", *args, "--run-dir", str(tmp_path / "plain")])
    monkeypatch.setattr(dm, "COMPILE_BACKEND", broken_backend)
    torch._dynamo.reset()
    capsys.readouterr()
    dm.main(["train", *args, "--compile", "--run-dir", str(tmp_path / "fallback")])
    err = capsys.readouterr().err
    notes = [l for l in err.splitlines() if "compiler cannot run" in l]
    assert len(notes) == 1 and "OSError" in notes[0] and "Read-only file system" in notes[0], err
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("plain", "fallback"))
    assert a["step"] == b["step"] == 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    base = ["sample", "--ckpt", str(tmp_path / "plain" / "ckpt.pt"), "--n", "2", "--steps", "3",
            "--format", "npz", "--precision", "fp32", "--device", "cpu"]
    dm.main(base + ["--out", str(tmp_path / "a.npz")])
    dm.main(base + ["--out", str(tmp_path / "b.npz"), "--compile"])
    assert capsys.readouterr().err.count("compiler cannot run") == 1
    x, y = (np.load(tmp_path / f)["images"] for f in ("a.npz", "b.npz"))
    assert np.array_equal(x, y)
    torch._dynamo.reset()


def test_an_unwritable_compiler_cache_is_one_line(tiny_run, tmp_path):
    """The real case, in a fresh interpreter: TORCHINDUCTOR_CACHE_DIR where no folder can be
    made. One note, the samples written, exit code 0."""
    import os, subprocess, sys
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR="/proc/no-such-cache")
    r = subprocess.run([sys.executable, dm.__file__, "sample", "--ckpt", str(tiny_run / "ckpt.pt"),
                        "--n", "2", "--steps", "2", "--compile", "--device", "cpu",
                        "--out", str(tmp_path / "s.png")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    notes = [l for l in r.stderr.splitlines() if l.startswith("note: --compile")]
    assert len(notes) == 1 and "/proc/no-such-cache" in notes[0] and "Traceback" not in r.stderr
    assert (tmp_path / "s.png").exists()


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
