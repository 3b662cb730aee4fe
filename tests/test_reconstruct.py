"""Generator-prior reconstruction (``medgen reconstruct``, medgen/reconstruction/): the forward
operators, their baselines, the MAP solver on a toy generator, the model interface, the command."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import FAST_DATA, make_plain_site, save
from medgen import strictjson
from medgen.cli.main import main
from medgen.config import ConfigError, load_config
from medgen.evaluation.distances import ssim
from medgen.models import build_model
from medgen.models.base import GENERATOR_PRIOR_FAMILIES, GenerativeModel, NoGeneratorPrior, standard_normal_prior
from medgen.reconstruction.features import RandomFeatures
from medgen.reconstruction.metrics import per_slice
from medgen.reconstruction.operators import Downsample, Mask, parse_task
from medgen.reconstruction.solve import Settings, solve
from medgen.server.rundir import RunDir

ALL_FAMILIES = ("vae", "cevae", "vqvae", "gan", "ddpm", "flow")


def _psnr(x, t):
    return float(np.mean(per_slice(x, t, {})["psnr"]))


# ----------------------------------------------------------------------------- operators
def test_downsampling_averages_blocks_and_its_baselines_keep_a_constant():
    x = torch.full((2, 1, 16, 16), 0.3)
    x[1] = 0.7
    op = parse_task("superres:4").operator(2, 16, seed=0)
    y = op(x)
    assert y.shape == (2, 1, 4, 4) and torch.allclose(y, x[:, :, :4, :4])
    for name, up in op.baselines(y).items():
        assert up.shape == x.shape and torch.allclose(up, x, atol=1e-6), name
    ramp = torch.arange(16.0).repeat(16, 1)[None, None] / 16  # block means of a ramp: the ramp's 4-px averages
    assert torch.allclose(Downsample(4)(ramp)[0, 0, 0], torch.tensor([1.5, 5.5, 9.5, 13.5]) / 16)
    guess = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.4
    assert torch.allclose(op(op.consistent(guess, y)), y, atol=1e-6)  # back-projection agrees with y
    assert op.data_term(y, op(x)).tolist() == [0.0, 0.0] and op.data_term(y, op(x + 0.1)).allclose(torch.tensor(0.01))
    with pytest.raises(ConfigError, match="--task superres:3.*not a multiple of 3"):
        parse_task("superres:3").operator(1, 16, seed=0)


def test_masking_keeps_observed_pixels_and_the_fills_touch_only_the_hole():
    size = 16
    yy, xx = torch.meshgrid(torch.arange(size.__float__()), torch.arange(float(size)), indexing="ij")
    x = (0.2 + 0.03 * xx + 0.01 * yy)[None, None].repeat(2, 1, 1, 1)  # a harmonic ramp in (0.2, 0.8)
    op = parse_task("inpaint:box").operator(2, size, seed=0)
    hole = op.missing.expand_as(x)
    assert hole.sum() == 2 * 8 * 8 and hole[0, 0, 4:12, 4:12].all()
    y = op(x)
    assert torch.equal(y[~hole], x[~hole]) and (y[hole] == 0).all()
    fills = op.baselines(y)
    assert list(fills) == ["diffusion", "mean-fill", "zero-filled"]
    for name, filled in fills.items():
        assert torch.equal(filled[~hole], x[~hole]), name
    assert torch.allclose(fills["mean-fill"][hole], x[~hole].mean().expand(int(hole.sum())), atol=1e-5)
    # a linear ramp solves Laplace's equation: the diffusion fill recovers it, the mean fill does not
    assert (fills["diffusion"] - x).abs().max() < 0.01 < (fills["mean-fill"] - x).abs().max()
    assert torch.equal(op.consistent(torch.zeros_like(x), y), y)
    assert torch.allclose(op.data_term(y, op(x + 0.1 * hole)), torch.zeros(2))  # the hole is not observed


def test_random_holes_differ_per_slice_and_are_seeded():
    a = parse_task("inpaint:random:0.3").operator(4, 32, seed=1)
    b = parse_task("inpaint:random:0.3").operator(4, 32, seed=1)
    assert a.missing.shape == (4, 1, 32, 32) and torch.equal(a.missing, b.missing)
    assert not torch.equal(a.missing[0], a.missing[1]) and abs(a.missing.float().mean() - 0.3) < 0.05
    assert torch.equal(a.subset(slice(2, 4)).missing, a.missing[2:])


def test_a_nifti_mask_file_is_the_hole(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[2:5, 7:9] = 1
    path = save(tmp_path / "hole.nii.gz", mask)
    op = parse_task(f"inpaint:{path}").operator(3, 16, seed=0)
    assert op.missing.shape == (1, 1, 16, 16) and torch.equal(op.missing[0, 0], torch.from_numpy(mask == 1))
    with pytest.raises(ConfigError, match=r"--task inpaint:.*hole.nii.gz has shape \(16, 16\); it must be \(32, 32\)"):
        parse_task(f"inpaint:{path}").operator(3, 32, seed=0)
    per_slice_masks = save(tmp_path / "three.nii.gz", np.stack([mask, mask * 0, mask], 2))
    assert parse_task(f"inpaint:{per_slice_masks}").operator(3, 16, seed=0).missing.shape == (3, 1, 16, 16)


@pytest.mark.parametrize("text, said", [
    ("superres", "the factor must be an integer"), ("superres:x", "the factor must be an integer"),
    ("superres:1", "the factor must be an integer >= 2"), ("deblur:2", "unknown task"), ("inpaint", "unknown task"),
    ("inpaint:box:1.5", "the box side must be a number between 0 and 1"),
    ("inpaint:random:lots", "the random fraction must be"),
    ("inpaint:no/such/mask.nii.gz", "mask file no/such/mask.nii.gz does not exist")])
def test_bad_task_strings_name_the_argument(text, said):
    with pytest.raises(ConfigError, match=f"--task {text}: {said}"):
        parse_task(text)


def test_metrics_and_ssim_against_monai():
    t = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x = (t + 0.1).clamp(0, 1)
    m = per_slice(x, t, {"all": torch.ones(1, 1, 32, 32, dtype=torch.bool), "none": torch.zeros(3, 1, 32, 32).bool()})
    mse = ((x - t) ** 2).flatten(1).mean(1).double()
    assert np.allclose(m["rmse"], mse.sqrt()) and np.allclose(m["rmse-all"], m["rmse"])
    assert np.allclose(m["psnr"], 10 * np.log10(1 / mse.numpy())) and np.isnan(m["rmse-none"]).all()
    monai = pytest.importorskip("monai.metrics", reason="MONAI (a test dependency) is not installed")
    reference = monai.SSIMMetric(spatial_dims=2, data_range=1.0, win_size=11, kernel_sigma=1.5, reduction="none")(x, t)
    assert np.allclose(ssim(x, t), reference.flatten().numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- the solver
def toy_prior(size=16, latent=6, seed=0):
    """A generator whose range holds the truth: G(w) = sigmoid(A w) with a fixed random A
    (high-frequency images that bicubic upsampling cannot recover)."""
    a = torch.randn(size * size, latent, generator=torch.Generator().manual_seed(seed))
    return standard_normal_prior(latent, lambda w, y: torch.sigmoid(w @ a.T).view(-1, 1, size, size))


@pytest.mark.parametrize("task", ["superres:4", "inpaint:box"])
def test_on_a_generator_whose_range_holds_the_truth_reconstruction_beats_the_baseline(task):
    prior = toy_prior()
    truth = prior.decode(prior.sample(6, torch.Generator().manual_seed(1)), None)
    op = parse_task(task).operator(6, 16, seed=0)
    y = op(truth)
    labels = torch.zeros(6, dtype=torch.long)
    solution = solve(prior, op, y, labels, Settings(steps=150, lr=0.1, lambda_prior=1e-4, starts=4))
    assert solution.images.shape == truth.shape and solution.latents.shape == (6, 6)
    assert solution.data_term[-1] < 0.05 * solution.data_term[0]  # the optimisation lowers the data term
    assert len(solution.data_term) == 151 and solution.loss[-1] < solution.loss[0]
    best_baseline = max(_psnr(b, truth) for b in op.baselines(y).values())
    assert _psnr(solution.images, truth) > best_baseline + 6  # dB


def test_the_feature_and_prior_terms_change_the_answer():
    prior, op = toy_prior(), Downsample(4)
    y = op(prior.decode(prior.sample(2, torch.Generator().manual_seed(1)), None))
    labels = torch.zeros(2, dtype=torch.long)
    plain = solve(prior, op, y, labels, Settings(steps=20, lambda_feat=0, lambda_prior=0))
    shrunk = solve(prior, op, y, labels, Settings(steps=20, lambda_feat=0, lambda_prior=10))
    featured = solve(prior, op, y, labels, Settings(steps=20, lambda_feat=1, lambda_prior=0))
    assert shrunk.latents.norm() < plain.latents.norm()
    assert not torch.allclose(featured.latents, plain.latents)
    phi = RandomFeatures()
    assert [f.shape for f in phi(torch.rand(2, 1, 16, 16))] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    assert all(torch.equal(a, b) for a, b in zip(phi.parameters(), RandomFeatures().parameters()))  # fixed


# ----------------------------------------------------------------------------- the model interface
def tiny_cfg(family, *more, tmp_path=None):
    cache = [f"data.cache_dir={tmp_path / 'cache'}"] if tmp_path else []
    extra = ["model.flow_steps=2"] if family == "flow" else []
    return load_config(None, [f"model.family={family}", "model.width=4", "model.latent_dim=8", "data.image_size=32",
                              *extra, *FAST_DATA, *cache, *more])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_families_opt_in_through_the_model_interface(family):
    model = build_model(tiny_cfg(family))
    overrides = type(model).generator_prior is not GenerativeModel.generator_prior
    assert overrides == (family in GENERATOR_PRIOR_FAMILIES)
    if not overrides:
        with pytest.raises(NoGeneratorPrior, match=f"model.family='{family}' has no generator prior"):
            model.generator_prior()
        return
    prior = model.generator_prior()
    w = prior.sample(3, torch.Generator().manual_seed(0)).requires_grad_(True)
    images = prior.decode(w, torch.tensor([0, 1, 0]))
    assert images.shape == (3, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    grad, = torch.autograd.grad(images.sum(), w)
    assert grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    assert prior.neg_log_prior(torch.zeros(2, 8)).tolist() == [0, 0]
    if prior.initial is not None:
        assert prior.initial(images.detach(), torch.tensor([0, 1, 0])).shape == (3, *prior.latent_shape)


# ----------------------------------------------------------------------------- the command
def checkpoint(tmp_path, family, **kw):
    cfg = tiny_cfg(family, tmp_path=tmp_path)
    return RunDir(tmp_path / f"run-{family}").save_checkpoint(1, build_model(cfg).state_dict(), {}, cfg)


def _fails(capsys, *args) -> str:
    assert main(["reconstruct", *map(str, args)]) == 3
    return capsys.readouterr().err


def test_cli_errors_name_the_argument(tmp_path, capsys):
    site = make_plain_site(tmp_path / "site", n_healthy=1, n_lesion=0)
    vae = checkpoint(tmp_path, "vae")
    err = _fails(capsys, "--checkpoint", vae, "--task", "superres:four", "--data", site)
    assert "error: --task superres:four: the factor must be an integer" in err and "Traceback" not in err
    err = _fails(capsys, "--checkpoint", vae, "--task", "superres:4", "--data", tmp_path / "nowhere")
    assert f"error: --data {tmp_path / 'nowhere'}: no such folder" in err
    ddpm = checkpoint(tmp_path, "ddpm")
    err = _fails(capsys, "--checkpoint", ddpm, "--task", "inpaint:box", "--data", site)
    assert f"error: --checkpoint {ddpm}: model.family='ddpm' has no generator prior" in err and "cevae, gan, vae" in err
    err = _fails(capsys, "--checkpoint", tmp_path / "none.pt", "--task", "inpaint:box", "--data", site)
    assert "none.pt: checkpoint file not found" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("family, task", [("vae", "superres:4"), ("gan", "inpaint:box:0.4")])
def test_reconstruct_writes_metrics_grids_and_nifti(tmp_path, capsys, family, task):
    site = make_plain_site(tmp_path / "site", n_healthy=2, n_lesion=1)
    out = tmp_path / "out"
    assert main(["reconstruct", "--checkpoint", str(checkpoint(tmp_path, family)), "--task", task,
                 "--data", str(site), "--out", str(out), "--slices", "5", "--steps", "3", "--starts", "2", "-q"]) == 0
    record = strictjson.loads((out / "metrics.json").read_text())
    assert record["family"] == family and record["n_slices"] == 5 and record["task"] == task
    assert record["heldout"] == "every slice of the folder"  # site is not a training site of the run
    methods = record["metrics"]
    baselines = (["bicubic", "nearest", "back-projection"] if task.startswith("superres")
                 else ["diffusion", "mean-fill", "zero-filled"])
    assert list(methods) == ["generator", "generator-consistent", *baselines]
    regions = ["rmse-brain"] + (["rmse-hole"] if task.startswith("inpaint") else [])
    for scores in methods.values():
        assert set(scores) == {"psnr", "ssim", "rmse", *regions} and scores["psnr"]["n"] == 5
        assert math.isfinite(scores["psnr"]["mean"]) and -1 <= scores["ssim"]["mean"] <= 1
    assert record["data_term"]["end"] <= record["data_term"]["start"]
    assert len(record["slices"]) == 5 and len(record["per_slice"]["generator"]["psnr"]) == 5
    assert np.mean(record["per_slice"]["generator"]["psnr"]) == pytest.approx(methods["generator"]["psnr"]["mean"])
    assert (out / "grid-1.png").stat().st_size > 1000 and not (out / "grid-2.png").exists()
    volume = nib.load(out / "generator.nii.gz")
    assert volume.shape == (32, 32, 5) and nib.load(out / "truth.nii.gz").shape == (32, 32, 5)
    truth = np.asanyarray(nib.load(out / "truth.nii.gz").dataobj)
    assert 0 <= truth.min() and truth.max() <= 1 and truth.max() > 0.5
    assert "reconstruction:" in capsys.readouterr().out


def test_heldout_slices_are_the_validation_subjects_of_a_training_site():
    from medgen.data.dataset import SiteSlices
    from medgen.reconstruction.command import heldout_slices

    n = 40  # 10 subjects x 4 slices
    subjects = np.repeat([f"s{i}" for i in range(10)], 4)
    data = SiteSlices("A", np.zeros((n, 8, 8), np.float32), np.ones((n, 8, 8), bool), np.zeros((n, 8, 8), bool),
                      np.zeros(n, np.int64), subjects, np.tile(np.arange(4), 10))
    _, val = data.split_subjects(0.2, seed=0)
    chosen = heldout_slices(data, ["A", "B"], 0.2, 0, n=100)
    assert sorted(set(chosen.subjects)) == sorted(set(val.subjects)) and len(chosen) == len(val) == 8
    other = heldout_slices(data, ["B"], 0.2, 0, n=5)
    assert len(other) == 5 and other.subjects[0] == "s0" and other.subjects[-1] == "s9"  # spread over the folder
    with pytest.raises(ConfigError, match="training sites and has no validation subjects"):
        heldout_slices(data, ["A"], 0.0, 0, n=5)
