"""Part I, the DDPM of the case study, is a program of its own: the text of the file up to
the Part II banner runs alone, trains a tiny model and samples from it, and its code names
nothing defined below it."""
import ast

import torch

from conftest import ROOT

TEXT = (ROOT / "ddpm_mnist.py").read_text()
PART_ONE = TEXT[:TEXT.index("# PART II")]


def test_part_one_alone_trains_a_tiny_model_and_samples_from_it(mnist_dir):
    ns = {"__name__": "part_one"}
    exec(compile(PART_ONE, "part_one", "exec"), ns)
    cfg = ns["Config"](channels=(8, 8, 16, 16), batch_size=32, epochs=2, lr=1e-3)
    torch.manual_seed(cfg.seed)
    images, _ = ns["load_mnist"](mnist_dir)                              # the synthetic digits
    p = ns["build"](cfg, ns["UNet"](cfg.channels, cfg.num_res_blocks), ns["NoiseSchedule"](cfg.T), "cpu")
    before = [w.clone() for w in p.ema.parameters()]
    losses = []
    ns["train"](cfg, images, p, on_step=lambda step, loss, t, err: losses.append(loss.item()))
    assert len(losses) == 2 * (len(images) // 32) and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, p.ema.parameters()))   # the EMA moved
    ns["train"](cfg, images, p, start=len(losses) - 1)                   # alone: no bookkeeping needed
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for x in (ns["ddim_sample"](p.ema, p.schedule, x_T, steps=5), ns["ddpm_sample"](p.ema, p.schedule, x_T)):
        assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all() and x.abs().max() <= 1


def test_part_one_names_nothing_defined_below_it():
    below = {n.name if hasattr(n, "name") else t.id for n in ast.parse(TEXT[len(PART_ONE):]).body
             for t in (getattr(n, "targets", None) or [n]) if hasattr(n, "name") or isinstance(t, ast.Name)}
    used = {n.id for n in ast.walk(ast.parse(PART_ONE)) if isinstance(n, ast.Name)}
    defined = {n.name for n in ast.parse(PART_ONE).body if hasattr(n, "name")}
    assert below and not (used & below - defined), used & below - defined
    assert len(PART_ONE.splitlines()) <= 450
