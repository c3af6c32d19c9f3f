"""The option that checks the case study's claim about the EMA: the raw weights beside it."""
import json

import pytest
import torch

import ddpm_mnist as dm


def test_evaluate_scores_the_raw_weights_when_asked(tiny_run, mnist_dir, classifier, tmp_path):
    ck = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    assert any(not torch.equal(ck["model"][k], ck["ema"][k]) for k in ck["model"])
    fids = {}
    for weights in ("ema", "model"):
        out = tmp_path / f"{weights}.json"
        dm.main(["evaluate", "--ckpt", str(tiny_run / "ckpt.pt"), "--weights", weights, "--n", "20", "--steps", "3",
                 "--data-dir", str(mnist_dir), "--classifier", str(classifier), "--out", str(out),
                 "--device", "cpu"])
        r = json.loads(out.read_text())
        assert f"{weights} weights" in r["samples_from"]
        fids[weights] = r["fid"]
    assert fids["ema"] != fids["model"]
