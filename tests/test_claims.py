"""The options that check the case study's claims: the time embeddings it argues against,
the raw weights beside the EMA, and the schedule recomputed at every step."""
import json

import pytest
import torch

import ddpm_mnist as dm


@pytest.mark.parametrize("kind, width", [("learned", 8), ("scalar", 1), ("sinusoidal", 8)])
def test_each_time_embedding_has_its_shape_and_tells_t_apart(kind, width):
    torch.manual_seed(0)
    net = dm.UNet(channels=(8, 8, 16, 16), time_embedding=kind, T=1000).eval()
    t = torch.tensor([10, 900])
    assert net.embed_time(t).shape == (2, width)
    x = torch.randn(1, 1, 28, 28).expand(2, -1, -1, -1)                # the same image at two t
    out = net(x, t)
    assert out.shape == (2, 1, 28, 28) and (out[0] - out[1]).abs().max() > 1e-5


def test_the_scalar_embedding_is_t_over_T_and_the_learned_one_a_table_row():
    net = dm.UNet(channels=(8, 8, 16, 16), time_embedding="scalar", T=1000)
    assert net.embed_time(torch.tensor([0, 250, 999])).flatten().tolist() == pytest.approx([0, 0.25, 0.999])
    net = dm.UNet(channels=(8, 8, 16, 16), time_embedding="learned", T=1000)
    assert torch.equal(net.embed_time(torch.tensor([7])), net.t_table.weight[7:8])


def test_the_default_network_and_old_configs_are_unchanged():
    keys = set(dm.UNet().state_dict())
    assert not any(k.startswith("t_table") for k in keys) and dm.UNet().time_mlp[0].in_features == 64
    old = {k: v for k, v in vars(dm.Config()).items() if k != "time_embedding"}   # a checkpoint from before
    assert dm.config_from_dict(old).time_embedding == "sinusoidal"
    assert set(dm.make_unet(dm.config_from_dict(old)).state_dict()) == keys


@pytest.mark.parametrize("schedule", dm.SCHEDULES)
def test_the_recomputed_schedule_equals_the_buffers(schedule):
    buffers = dm.NoiseSchedule(schedule=schedule)
    recomputed = dm.RecomputedSchedule(schedule=schedule)
    x0 = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 500, 998, 999])
    # a 1000-term product in float32 against float64 cast to float32: equal up to rounding
    torch.testing.assert_close(recomputed.q_sample(x0, t, eps), buffers.q_sample(x0, t, eps), rtol=1e-4, atol=1e-5)


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
