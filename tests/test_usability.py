"""What a careful read and a new user found: each test here failed before its fix."""
import ast
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_mnist as dm
from conftest import ROOT, TINY_ARGS, cli


# --- pictures say the paper's t ------------------------------------------------

def test_forward_strip_columns_are_the_papers_t():
    """Column t=1 is x_1, noised with beta_1 alone; column t=1000 is x_T."""
    assert dm.FORWARD_T[0] == 1 and dm.FORWARD_T[-1] == 1000
    from conftest import synthetic_digits
    images, _ = synthetic_digits(1)
    img = torch.from_numpy(np.array(dm.forward_picture(images, dm.NoiseSchedule())))
    x0 = dm.to_model_range(images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    beta_1 = 1e-4                                   # x_1 = sqrt(1 - beta_1) x_0 + sqrt(beta_1) eps
    want = dm.to_uint8((1 - beta_1) ** 0.5 * x0 + beta_1 ** 0.5 * noise)[0]
    assert torch.equal(img[2:2 + 84:3, 2:2 + 84:3], want)


def test_gif_frames_are_labelled_with_the_papers_t_after_each_step():
    # DDPM visits indices 999..0; after the step from index t it holds the paper's x_t
    ddpm = dm.Sampler("ddpm", 1000).timesteps(1000)
    assert [dm.paper_t_after(ddpm, i) for i in (0, 1, 998, 999)] == [999, 998, 1, 0]
    # DDIM-50 visits 999, 979, ...; its first step lands on index 979, the paper's t = 980
    ddim = dm.Sampler("ddim", 50).timesteps(1000)
    assert ddim[:2] == [999, 979] and dm.paper_t_after(ddim, 0) == 980 and dm.paper_t_after(ddim, 49) == 0


# --- a new user's first commands -------------------------------------------------

def test_sampling_without_a_run_uses_the_committed_weights_and_says_so(tmp_path):
    r = cli("sample", "--n", "4", "--steps", "2", "--out", tmp_path / "x.png", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    note = [l for l in r.stderr.splitlines() if l.startswith("note:")]
    assert len(note) == 1 and "samples/ema_fp16.pt" in note[0] and "train" in note[0]
    assert "trained 8,335 steps (17.8 epochs) in 5.0 min on cuda (NVIDIA H100 80GB HBM3)" in note[0]   # how long
    assert Image.open(tmp_path / "x.png").size == (2 * 30 + 2, 2 * 30 + 2)      # 4 digits, 2 a row
    # an explicit --ckpt that does not exist stays an error
    r = cli("sample", "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "y.png", cwd=tmp_path)
    assert r.returncode == 2 and "nope.pt" in r.stderr and not (tmp_path / "y.png").exists()


def test_evaluate_of_an_npz_reports_beside_it_and_names_no_checkpoint(tiny_run, mnist_dir, classifier, tmp_path):
    """The default checkpoint exists in the folder, yet the report is about the file."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ddpm").symlink_to(tiny_run)
    sub = tmp_path / "mine"
    sub.mkdir()
    np.savez(sub / "s.npz", images=np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8))
    r = cli("evaluate", "--samples", sub / "s.npz", "--data-dir", mnist_dir, "--classifier", classifier,
            "--device", "cpu", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (tiny_run / "evaluate.json").exists()
    report = json.loads((sub / "evaluate.json").read_text())
    assert "ckpt" not in report and report["samples_file"].endswith("s.npz")


def test_evaluate_of_any_committed_weights_reports_in_the_current_folder(mnist_dir, classifier, tmp_path,
                                                                           monkeypatch):
    """samples/ is the project's: a report there would sit among the committed files."""
    monkeypatch.chdir(tmp_path)
    dm.main(["evaluate", "--ckpt", str(ROOT / "samples" / "ema_cpu_fp16.pt"), "--n", "2", "--steps", "1",
             "--data-dir", str(mnist_dir), "--classifier", str(classifier), "--device", "cpu"])
    assert json.loads((tmp_path / "evaluate.json").read_text())["n"] == 2
    assert not (ROOT / "samples" / "evaluate.json").exists()


def test_a_batch_larger_than_the_data_is_refused_before_anything_is_written(mnist_dir, tmp_path):
    r = cli("train", *TINY_ARGS[:-4], "--batch-size", "100000", "--data-dir", mnist_dir,
            "--run-dir", tmp_path / "new", "--device", "cpu")
    assert r.returncode == 2 and "--batch-size" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_resume_reads_the_checkpoint_once(tiny_run, mnist_dir, tmp_path, monkeypatch):
    run = tmp_path / "r"
    run.mkdir()
    (run / "ckpt.pt").write_bytes((tiny_run / "ckpt.pt").read_bytes())
    calls = []
    real = dm.load_checkpoint
    monkeypatch.setattr(dm, "load_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    dm.main(["train", "--run-dir", str(run), "--resume", "--epochs", "3", "--data-dir", str(mnist_dir),
             "--device", "cpu"])
    assert len(calls) == 1 and torch.load(run / "ckpt.pt", weights_only=True)["step"] == 24


def test_resuming_an_export_file_is_one_line(tiny_run, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    dm.main(["export", "--ckpt", str(tiny_run / "ckpt.pt"), "--out", str(run / "ckpt.pt")])
    before = (run / "ckpt.pt").read_bytes()
    r = cli("train", "--run-dir", run, "--resume", "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "export" in r.stderr and (run / "ckpt.pt").read_bytes() == before


# --- help that does not mislead ---------------------------------------------------

def test_train_help_names_each_presets_default(capsys):
    with pytest.raises(SystemExit):
        dm.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("lr", "batch_size", "epochs", "ema_decay"):
        for preset, cfg in dm.PRESETS.items():
            assert f"{getattr(cfg, flag)} with --preset {preset}" in text, (flag, preset)


def test_shared_flags_read_the_same_everywhere():
    sub = next(a for a in dm.build_parser()._actions if a.dest == "command")
    helps = {}
    for parser in sub.choices.values():
        for action in parser._actions:
            for flag in ("--device", "--data-dir", "--ckpt"):
                if flag in action.option_strings:
                    helps.setdefault(flag, set()).add(action.help)
    assert len(helps["--device"]) == 1 and len(helps["--data-dir"]) == 1, helps
    assert len(helps["--ckpt"]) == 2                    # sampling commands, and export's own


# --- what the project needs to install --------------------------------------------

def test_requirements_list_every_third_party_import():
    tree = ast.parse((ROOT / "ddpm_mnist.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    third_party = {n for n in names if n not in sys.stdlib_module_names}
    pip_name = {"PIL": "pillow"}
    reqs = {re.split(r"[<>=!~ ]", l)[0].lower() for l in (ROOT / "requirements.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")}
    assert {pip_name.get(n, n).lower() for n in third_party} <= reqs, third_party


def test_readme_commands_use_the_default_data_folder():
    commands = [l for l in (ROOT / "README.md").read_text().splitlines() if "python ddpm_mnist.py" in l]
    assert commands and not [c for c in commands if "../shared" in c]


# --- logs and other platforms ------------------------------------------------------

def test_progress_bars_into_a_log_redraw_rarely(tiny_run, tmp_path):
    r = cli("sample", "--ckpt", tiny_run / "ckpt.pt", "--steps", "150", "--n", "4", "--out", tmp_path / "d.png",
            "--device", "cpu")                                 # a tqdm default would redraw every 0.1 s
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\r") + r.stderr.count("\n") <= 6, r.stderr[-800:]


def test_the_training_bar_shows_images_per_second_in_a_log(mnist_dir, tmp_path, capsys):
    """Into a log tqdm's own rate stays unset until its first redraw, a minute in: the bar
    showed img_s=0 through a whole 5-minute GPU run's first minute."""
    dm.main(["train", *TINY_ARGS, "--grid-n", "0", "--epochs", "1", "--data-dir", str(mnist_dir),
             "--run-dir", str(tmp_path / "r")])
    rates = [int(v) for v in re.findall(r"img_s=(\d+)", capsys.readouterr().err)]
    assert rates and all(r > 0 for r in rates), rates


def test_bf16_auto_falls_back_to_fp32_without_the_onednn_query(monkeypatch):
    class NoQuery:
        pass

    class Broken:
        @staticmethod
        def _is_mkldnn_bf16_supported():
            raise RuntimeError("not compiled with oneDNN")
    cpu = torch.device("cpu")
    for stand_in in (NoQuery(), Broken()):
        monkeypatch.setattr(torch.ops, "mkldnn", stand_in, raising=False)
        assert dm.choose_precision(cpu, "auto")[0] is None
    assert dm.choose_precision(cpu, "bf16")[0] == torch.bfloat16 and dm.choose_precision(cpu, "fp32")[0] is None


def test_resuming_a_finished_run_is_one_line(tiny_run, mnist_dir, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "ckpt.pt").write_bytes((tiny_run / "ckpt.pt").read_bytes())
    r = cli("train", "--run-dir", run, "--resume", "--device", "cpu", "--data-dir", mnist_dir)
    assert r.returncode == 2 and "step 16 already" in r.stderr and len(r.stderr.strip().splitlines()) == 1
