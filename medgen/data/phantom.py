"""Multi-site phantom cohort: real brain anatomy, per-subject variation, per-site scanners, lesions.

Anatomy is the MNI ICBM-152 2009 template that ships inside the nilearn wheel (grey matter, white
matter and brain mask at 1 mm; CSF = brain mask - GM - WM). Nothing is downloaded.

Each subject is generated directly on its site's output grid: every output voxel is mapped to
template coordinates through (site grid affine, subject affine, smooth displacement field) and
the site's template-space intensity map and the subject's lesion map are sampled there once
(``scipy.ndimage.map_coordinates``, linear). The lesion map is sampled through the same mapping as
the image, so the written mask sits exactly where the intensity was changed. Scanner effects
(gamma, bias field, artefact, Rician noise) are applied on the output grid, then the volume is
reoriented to the site's storage orientation and written in the site's dtype.

Conventions: "canonical" arrays are RAS-ordered (axis 0 = left->Right, 1 = posterior->Anterior,
2 = inferior->Superior); world coordinates are MNI-like millimetres. Intensities before storage
are in "tissue units" (white matter of a T1 site ~0.85); storage multiplies by ``profile.scale``.

Randomness: ``np.random.SeedSequence(seed, spawn_key=(site_index,))`` for site-level draws and its
children ``(site_index, subject_index)`` per subject, so a subject is the same whatever other sites
or subjects are generated.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy import fft as sfft

BRAIN_CENTRE_MM = np.array([0.0, -18.0, 12.0])  # rotation centre for the subject affine (MNI mm)
_HEAD_MARGIN_MM = 16  # template crop margin around the brain (room for the synthetic scalp)


# --------------------------------------------------------------------------- site profiles

@dataclass(frozen=True)
class SiteProfile:
    """One hospital's scanner and export habits.

    Tissue intensities are in tissue units before ``gamma``; ``voxel_mm`` is in canonical (R, A, S)
    axis order; ``noise`` is the Rician sigma as a fraction of the brightest tissue; ``bias`` is the
    peak log-amplitude of the multiplicative bias field; ``blur_mm`` an extra isotropic Gaussian
    FWHM on top of the slice profile (FWHM = voxel size).
    """

    name: str
    contrast: str
    gm: float
    wm: float
    csf: float
    gamma: float
    lesion: Literal["hypo", "hyper", "mixed"]
    hyper_level: float  # target intensity of hyperintense lesions (tissue units)
    bias: float
    noise: float
    voxel_mm: tuple[float, float, float]
    blur_mm: float
    artefact: Literal["none", "ghost", "ringing"]
    artefact_strength: float
    skull: bool  # True: whole head (scalp, skull, noisy air); False: skull-stripped export, air = 0
    orientation: str
    dtype: Literal["float32", "int16_scaled", "int16", "uint8"]
    scale: float  # stored value per tissue unit

    def summary(self) -> str:
        """One line for figure labels: orientation, dtype, voxel size, contrast, effects."""
        vox = "x".join(f"{v:g}" for v in _reorient_zooms(self.voxel_mm, self.orientation))
        extras = [self.artefact] if self.artefact != "none" else []
        extras += ["skull"] if self.skull else ["stripped"]
        return (f"{self.orientation} {self.dtype} {vox} mm\n{self.contrast}, {self.lesion} lesions\n"
                f"bias {self.bias:.2f}, noise {100 * self.noise:.1f}%\n{', '.join(extras)}")


PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile("3T MPRAGE", "T1w", gm=0.55, wm=0.85, csf=0.15, gamma=1.0, lesion="hypo",
                hyper_level=1.15, bias=0.10, noise=0.015, voxel_mm=(1.0, 1.0, 1.0), blur_mm=0.0,
                artefact="none", artefact_strength=0.0, skull=False, orientation="RAS",
                dtype="float32", scale=1000.0),
    SiteProfile("1.5T thick-slice FLAIR", "FLAIR-like", gm=0.62, wm=0.45, csf=0.06, gamma=1.0,
                lesion="hyper", hyper_level=1.05, bias=0.30, noise=0.035, voxel_mm=(1.0, 1.0, 3.0),
                blur_mm=0.0, artefact="ringing", artefact_strength=1.5, skull=False,
                orientation="LPS", dtype="int16_scaled", scale=800.0),
    SiteProfile("1.5T sagittal T1", "T1w low contrast", gm=0.50, wm=0.68, csf=0.22, gamma=0.75,
                lesion="mixed", hyper_level=1.0, bias=0.20, noise=0.03, voxel_mm=(2.5, 1.2, 1.2),
                blur_mm=0.8, artefact="none", artefact_strength=0.0, skull=False,
                orientation="PSR", dtype="uint8", scale=200.0),
    SiteProfile("3T T1 head", "T1w + scalp", gm=0.45, wm=0.80, csf=0.10, gamma=1.25,
                lesion="hypo", hyper_level=1.1, bias=0.25, noise=0.025, voxel_mm=(1.1, 1.1, 1.1),
                blur_mm=0.0, artefact="ghost", artefact_strength=0.07, skull=True,
                orientation="LAS", dtype="int16", scale=1500.0),
)


def site_profile(index: int, rng: np.random.Generator) -> SiteProfile:
    """Profile of the ``index``-th site: PROFILES[index % 4], small perturbations (drawn from
    ``rng``) from index 4 on."""
    base = PROFILES[index % len(PROFILES)]
    if index < len(PROFILES):
        return base
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    return replace(
        base, name=f"{base.name} (variant {index // len(PROFILES)})",
        gm=round(base.gm * u(0.92, 1.08), 3), wm=round(base.wm * u(0.92, 1.08), 3),
        csf=round(base.csf * u(0.85, 1.15), 3), gamma=round(base.gamma * u(0.9, 1.1), 3),
        bias=round(base.bias * u(0.8, 1.25), 3), noise=round(base.noise * u(0.8, 1.25), 4),
        voxel_mm=tuple(round(v * u(0.92, 1.08) * 20) / 20 for v in base.voxel_mm),
        artefact_strength=round(base.artefact_strength * u(0.8, 1.2), 3),
    )


def _reorient_zooms(voxel_ras: tuple[float, ...], code: str) -> tuple[float, ...]:
    """Voxel sizes in the storage axis order of orientation ``code`` (from R, A, S order)."""
    axis_of = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
    return tuple(voxel_ras[axis_of[c]] for c in code)


# --------------------------------------------------------------------------- template

@dataclass(frozen=True)
class Template:
    """MNI ICBM-152 2009 at 1 mm, cropped to the head box. Arrays (X, Y, Z) float32 in [0, 1]."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # bool
    origin_mm: np.ndarray  # world (MNI) position of voxel (0, 0, 0); spacing is 1 mm, RAS axes
    brain_lo_mm: np.ndarray  # brain bounding box in world mm
    brain_hi_mm: np.ndarray

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        return xyz - self.origin_mm


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Load (once per process) the template tissue maps shipped with nilearn; no download."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    affine = t1.affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError(f"unexpected MNI template affine {affine.tolist()}")
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32) > 0.5
    gm, wm = gm * brain, wm * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - _HEAD_MARGIN_MM, 0)
    hi = np.minimum(idx.max(0) + _HEAD_MARGIN_MM + 1, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    origin = affine[:3, 3] + lo
    return Template(gm=np.ascontiguousarray(gm[box]), wm=np.ascontiguousarray(wm[box]),
                    csf=np.ascontiguousarray(csf[box]), brain=np.ascontiguousarray(brain[box]),
                    origin_mm=origin, brain_lo_mm=affine[:3, 3] + idx.min(0),
                    brain_hi_mm=affine[:3, 3] + idx.max(0))


@lru_cache(maxsize=1)
def _outside_distance_mm() -> np.ndarray:
    """Distance (mm, float32) from each template voxel to the brain mask; 0 inside."""
    return ndi.distance_transform_edt(~load_template().brain).astype(np.float32)


def _psf_sigma(profile: SiteProfile) -> np.ndarray:
    """Gaussian sigma (template voxels = mm, per R/A/S axis) of the site's slice profile + blur."""
    fwhm2 = np.maximum(np.square(profile.voxel_mm) - 1.0, 0.0) + profile.blur_mm ** 2
    return np.sqrt(fwhm2) / 2.3548


def _band(d: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray) -> np.ndarray:
    """Soft indicator (1 mm ramps) of lo < d < hi."""
    return np.clip(d - lo + 0.5, 0, 1) - np.clip(d - hi + 0.5, 0, 1)


def site_map(profile: SiteProfile, rng: np.random.Generator) -> np.ndarray:
    """The site's intensity model in template space (cropped template shape, float32 tissue units).

    GM/WM/CSF mixed with the site's intensities; with ``profile.skull`` a CSF gap, dark skull and
    bright scalp shell (thicknesses modulated by a smooth random field) are added outside the
    brain from a distance transform. Blurred with the site's slice profile (anti-aliasing for
    thick slices).
    """
    t = load_template()
    out = profile.gm * t.gm + profile.wm * t.wm + profile.csf * t.csf
    if profile.skull:
        d = _outside_distance_mm()
        w = 1.0 + 0.25 * _smooth_field(rng, d.shape, n_ctrl=4)  # thickness modulation
        gap, bone, scalp = 2.5 * w, 7.0 * w, 12.0 * w
        out += profile.csf * _band(d, 0.0, gap) + 0.03 * _band(d, gap, bone)
        out += 1.1 * max(profile.gm, profile.wm) * _band(d, bone, scalp)
        out[t.brain] = (profile.gm * t.gm + profile.wm * t.wm + profile.csf * t.csf)[t.brain]
    return ndi.gaussian_filter(out.astype(np.float32), _psf_sigma(profile), truncate=3.0)


# --------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class SiteGrid:
    """Canonical (RAS) output grid of a site: ``shape`` voxels, ``affine`` voxel -> world mm."""

    shape: tuple[int, int, int]
    affine: np.ndarray


def site_grid(profile: SiteProfile, rng: np.random.Generator) -> SiteGrid:
    """Field of view around the brain (wider with a scalp), non-round scanner-like offsets."""
    t = load_template()
    margin = 26.0 if profile.skull else 12.0
    lo = t.brain_lo_mm - margin
    lo[2] = max(lo[2], t.origin_mm[2])  # the template stops at the neck
    hi = t.brain_hi_mm + margin
    vox = np.asarray(profile.voxel_mm)
    shape = tuple(int(n) for n in np.ceil((hi - lo) / vox))
    origin = lo - rng.uniform(0.0, 1.0, 3) * vox  # sub-voxel jitter: offsets like -84.37
    affine = np.eye(4)
    affine[:3, :3] = np.diag(vox)
    affine[:3, 3] = np.round(origin, 4)
    return SiteGrid(shape, affine)


def _interp_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) Gaussian-RBF weights spreading control values smoothly over n_out samples."""
    pos = np.linspace(0.0, n_ctrl - 1.0, n_out)[:, None]
    w = np.exp(-0.5 * np.square(pos - np.arange(n_ctrl)[None, :]) / 0.8 ** 2)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: int) -> np.ndarray:
    """Smooth random field on ``shape`` from an n_ctrl^3 control grid, scaled to max |value| = 1."""
    ctrl = rng.standard_normal((n_ctrl,) * 3).astype(np.float32)
    mx, my, mz = (_interp_matrix(n, n_ctrl) for n in shape)
    small = np.einsum("jb,abc,kc->ajk", my, ctrl, mz, optimize=True)  # (n_ctrl, Y, Z)
    f = (mx @ small.reshape(n_ctrl, -1)).reshape(shape)  # one (X, n_ctrl) x (n_ctrl, Y*Z) matmul
    return f / max(float(np.abs(f).max()), 1e-6)


def rotation(deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_coordinates(grid: SiteGrid, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Template voxel coordinates (3, *grid.shape) float32 of every output voxel, and the params.

    world y -> template x = c + R S (y - c) + t + u(y): scale S +-5 %, rotation R +-4 deg per axis,
    translation t +-4 mm, u a smooth displacement (10^3 control grid, RMS 1.5-3 mm).
    """
    t = load_template()
    scale = rng.uniform(0.95, 1.05, 3)
    rot = rng.uniform(-4.0, 4.0, 3)
    shift = rng.uniform(-4.0, 4.0, 3)
    rms = rng.uniform(1.5, 3.0)
    q = rotation(rot) @ np.diag(scale)
    m = q @ grid.affine[:3, :3]  # output voxel -> template mm (linear part)
    b = q @ (grid.affine[:3, 3] - BRAIN_CENTRE_MM) + BRAIN_CENTRE_MM + shift - t.origin_mm
    axes = [np.arange(n, dtype=np.float32) for n in grid.shape]
    coords = np.empty((3, *grid.shape), np.float32)
    disp = [_smooth_field(rng, grid.shape, n_ctrl=10) for _ in range(3)]
    norm = rms / max(float(np.sqrt(np.mean([np.mean(np.square(u)) for u in disp]))), 1e-6)
    for d in range(3):
        coords[d] = (m[d, 0] * axes[0][:, None, None] + m[d, 1] * axes[1][None, :, None]
                     + m[d, 2] * axes[2][None, None, :] + b[d])
        coords[d] += norm * disp[d]
    params = {"scale": scale.round(4).tolist(), "rotation_deg": rot.round(3).tolist(),
              "translation_mm": shift.round(3).tolist(), "deformation_rms_mm": round(float(rms), 3)}
    return coords, params


# --------------------------------------------------------------------------- lesions

# Vascular-territory-like boxes (MNI mm, right hemisphere; x is mirrored for the left), weight.
TERRITORIES = {
    "MCA": ((25, 55), (-40, 25), (-5, 45), 0.5),
    "deep": ((15, 30), (-20, 15), (-5, 20), 0.25),
    "PCA": ((8, 30), (-95, -60), (-10, 20), 0.15),
    "ACA": ((4, 15), (0, 45), (25, 60), 0.10),
}


@dataclass(frozen=True)
class Lesions:
    """Subject lesions in template space: soft map ``box`` (float32 in [0, 1], PSF-blurred) whose
    voxel (0, 0, 0) is template voxel ``lo``; plus their description for cohort.json."""

    box: np.ndarray
    lo: np.ndarray
    kind: Literal["hypo", "hyper"]
    strength: float  # fraction of the way to the lesion target intensity
    info: dict


def draw_lesions(profile: SiteProfile, rng: np.random.Generator) -> Lesions:
    """1-3 irregular stroke-like lesions, total 1-40 ml (log-uniform), mostly one hemisphere.

    Each: an ellipsoid (random axes and orientation) with a boundary roughened by a smoothed
    random field, centred in a vascular territory on brain tissue, clipped to GM+WM > 0.3.
    """
    t = load_template()
    tissue = (t.gm + t.wm) > 0.3
    total_ml = float(np.exp(rng.uniform(np.log(1.0), np.log(40.0))))
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    shares = rng.dirichlet(np.full(n, 2.0))
    side = float(rng.choice([-1.0, 1.0]))
    kind = profile.lesion if profile.lesion != "mixed" else str(rng.choice(["hypo", "hyper"]))
    strength = float(rng.uniform(0.55, 0.9))
    names = list(TERRITORIES)
    weights = np.array([TERRITORIES[k][3] for k in names])
    lesion_full = np.zeros(t.brain.shape, bool)
    placed = []
    for share in shares:
        vol_ml = max(total_ml * share, 0.6)
        for _ in range(50):
            terr = str(rng.choice(names, p=weights / weights.sum()))
            x_rng, y_rng, z_rng, _w = TERRITORIES[terr]
            hemi = side if rng.random() < 0.85 else -side
            v_ml = min(vol_ml, 4.0) if terr == "deep" else vol_ml
            centre_mm = np.array([hemi * rng.uniform(*x_rng), rng.uniform(*y_rng), rng.uniform(*z_rng)])
            c = np.round(t.world_to_voxel(centre_mm)).astype(int)
            if not (np.all(c >= 0) and np.all(c < tissue.shape) and tissue[tuple(c)]):
                continue
            blob = _blob(rng, v_ml)
            lo = c - np.array(blob.shape) // 2
            src, dst = _overlap(lo, blob.shape, tissue.shape)
            part = blob[src] & tissue[dst]
            if part.sum() >= 0.5 * blob.sum():  # mostly on brain tissue
                lesion_full[dst] |= part
                placed.append({"territory": terr, "hemisphere": "R" if hemi > 0 else "L",
                               "centre_mm": centre_mm.round(1).tolist()})
                break
    if not placed:
        raise RuntimeError("could not place a lesion on brain tissue")
    idx = np.argwhere(lesion_full)
    sigma = np.sqrt(_psf_sigma(profile) ** 2 + 0.5 ** 2)
    pad = np.ceil(3 * sigma).astype(int) + 2
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, lesion_full.shape)
    box = lesion_full[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32)
    box = ndi.gaussian_filter(box, sigma, truncate=3.0)
    info = {"kind": kind, "strength": round(strength, 3), "n_lesions": len(placed),
            "template_volume_ml": round(float(lesion_full.sum()) / 1000, 3), "lesions": placed}
    return Lesions(box, lo, kind, strength, info)


def _blob(rng: np.random.Generator, vol_ml: float) -> np.ndarray:
    """Boolean irregular blob of about ``vol_ml`` ml on a 1 mm grid (centred in its array)."""
    r_eq = (3 * vol_ml * 1000 / (4 * math.pi)) ** (1 / 3)
    axes = np.exp(rng.normal(0.0, 0.25, 3))
    axes = r_eq * axes / np.prod(axes) ** (1 / 3)
    half = int(np.ceil(axes.max() * 1.4)) + 2
    g = np.mgrid[-half:half + 1, -half:half + 1, -half:half + 1].astype(np.float32)
    rot = rotation(rng.uniform(-180, 180, 3)).astype(np.float32)
    local = np.einsum("ij,j...->i...", rot.T, g)
    rho = np.sqrt(sum((local[i] / axes[i]) ** 2 for i in range(3)))
    noise = ndi.gaussian_filter(rng.standard_normal(rho.shape).astype(np.float32), max(1.5, 0.3 * r_eq))
    noise /= max(float(noise.std()), 1e-6)
    return rho + 0.25 * noise < 1.0


def _overlap(lo: np.ndarray, size: tuple[int, ...], shape: tuple[int, ...]):
    """Slices (into a box at ``lo`` of ``size``, into an array of ``shape``) of their overlap."""
    a = np.maximum(lo, 0)
    b = np.minimum(lo + np.array(size), shape)
    return (tuple(slice(i - j, k - j) for i, j, k in zip(a, lo, b)),
            tuple(slice(i, k) for i, k in zip(a, b)))


def _sample_lesion(lesions: Lesions, coords: np.ndarray) -> np.ndarray:
    """Lesion fraction (float32, grid shape) at ``coords`` (template voxels); 0 far from it."""
    out = np.zeros(coords.shape[1:], np.float32)
    hi = lesions.lo + np.array(lesions.box.shape) - 1
    near = np.ones(out.shape, bool)
    for d in range(3):
        near &= (coords[d] > lesions.lo[d] - 1) & (coords[d] < hi[d] + 1)
    pts = coords[:, near] - lesions.lo[:, None].astype(np.float32)
    out[near] = ndi.map_coordinates(lesions.box, pts, order=1, cval=0.0, output=np.float32)
    return out


# --------------------------------------------------------------------------- scanner effects

def apply_artefact(img: np.ndarray, profile: SiteProfile, rng: np.random.Generator) -> np.ndarray:
    """Ghost (faint copy shifted by half the FOV along the phase-encode A-P axis) or motion
    ringing (random k-space lines along A-P phase-shifted, as by a few-voxel head jerk)."""
    if profile.artefact == "ghost":
        return img + profile.artefact_strength * np.roll(img, img.shape[1] // 2, axis=1)
    if profile.artefact == "ringing":
        n = img.shape[1]
        k = sfft.fftfreq(n).astype(np.float32)
        hit = (rng.random(n) < 0.25) & (np.abs(k) > 0.04)
        shift = rng.normal(0.0, profile.artefact_strength, n) * hit
        phase = np.exp(-2j * np.pi * k * shift).astype(np.complex64)
        spec = sfft.fft(img, axis=1, workers=-1) * phase[None, :, None]
        return np.abs(sfft.ifft(spec, axis=1, workers=-1)).astype(np.float32)
    return img


def add_rician_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of (img + complex Gaussian noise of std ``sigma`` per channel)."""
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(np.square(img + sigma * n1) + np.square(sigma * n2))


# --------------------------------------------------------------------------- subjects

@dataclass(frozen=True)
class Site:
    """Everything shared by one site's subjects."""

    name: str
    index: int
    seed: int
    profile: SiteProfile
    grid: SiteGrid
    tissue_map: np.ndarray  # template-space intensity model (see site_map)


def make_site(name: str, index: int, seed: int) -> Site:
    """Profile, output grid and template-space intensity map of the ``index``-th site."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    profile = site_profile(index, rng)
    grid = site_grid(profile, rng)
    return Site(name, index, seed, profile, grid, site_map(profile, rng))


@dataclass(frozen=True)
class PhantomSubject:
    """One generated volume on the site's canonical grid.

    image: float32 (X, Y, Z) RAS, tissue units (before storage scaling);
    mask: bool (X, Y, Z) lesion mask, or None for healthy subjects; info: for cohort.json.
    """

    id: str
    image: np.ndarray
    mask: np.ndarray | None
    info: dict


def is_lesion_subject(index: int, lesion_fraction: float) -> bool:
    """Deterministic interleaved labels: the first n subjects hold round(n * fraction) lesions."""
    f = lesion_fraction
    return math.floor((index + 1) * f + 0.5) > math.floor(index * f + 0.5)


def make_subject(site: Site, index: int, lesion: bool, apply_lesion: bool = True,
                 id_width: int = 3) -> PhantomSubject:
    """Generate subject ``index`` (id ``sub-<index+1>``) of ``site``; ``lesion`` draws lesions.

    The mask is where the sampled (slice-profile blurred) lesion fraction is >= 0.5; intensities
    move towards the lesion target by fraction * strength at exactly the mask voxels (and nowhere
    else, apart from a site's ghost/ringing copy). ``apply_lesion=False`` keeps everything
    identical (same random draws, same mask) but leaves the intensities unchanged: the difference
    of the two images is exactly the lesion's effect.
    """
    p = site.profile
    anat_ss, lesion_ss, scan_ss = np.random.SeedSequence(
        site.seed, spawn_key=(site.index, index)).spawn(3)
    coords, anatomy = subject_coordinates(site.grid, np.random.default_rng(anat_ss))
    img = ndi.map_coordinates(site.tissue_map, coords, order=1, cval=0.0, output=np.float32)
    brain = img > 0.5 * min(p.gm, p.wm, p.csf)  # support of the skull-stripped export
    mask, info = None, {"label": "lesion" if lesion else "healthy"}
    if lesion:
        les = draw_lesions(p, np.random.default_rng(lesion_ss))
        frac = _sample_lesion(les, coords)  # partial-volume lesion fraction
        mask = frac >= 0.5
        target = p.csf if les.kind == "hypo" else p.hyper_level
        changed = img + np.where(mask, frac * les.strength, 0.0) * (target - img)  # exactly on the mask
        contrast = float(changed[mask].mean() / max(float(img[mask].mean()), 1e-6) - 1) if mask.any() else 0.0
        if apply_lesion:
            img = changed
        vox_ml = float(np.prod(p.voxel_mm)) / 1000
        info.update({"lesion_volume_ml": round(float(mask.sum()) * vox_ml, 3),
                     "lesion_contrast": round(contrast, 3), **les.info})
    del coords
    rng = np.random.default_rng(scan_ss)
    img = np.power(np.maximum(img, 0.0), p.gamma, dtype=np.float32)
    bias_amp = p.bias * rng.uniform(0.7, 1.0)
    img *= np.exp(bias_amp * _smooth_field(rng, site.grid.shape, n_ctrl=4))
    img = apply_artefact(img, p, rng)
    sigma = p.noise * max(p.gm, p.wm) ** p.gamma
    if p.skull:
        img = add_rician_noise(img, sigma, rng)
    else:  # skull-stripped export: noise only matters (and is only drawn) inside the brain
        stripped = np.zeros_like(img)
        stripped[brain] = add_rician_noise(img[brain], sigma, rng)
        img = stripped
    info.update({"anatomy": anatomy, "bias_amplitude": round(float(bias_amp), 4),
                 "noise_sigma": round(float(sigma), 5)})
    return PhantomSubject(f"sub-{index + 1:0{id_width}d}", img.astype(np.float32), mask, info)


# --------------------------------------------------------------------------- storage

def to_storage(arr_ras: np.ndarray, affine_ras: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a canonical (RAS) array to axis codes ``code``; the affine keeps world positions."""
    t = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                        nib.orientations.axcodes2ornt(tuple(code)))
    out = nib.orientations.apply_orientation(arr_ras, t)
    affine = affine_ras @ nib.orientations.inv_ornt_aff(t, arr_ras.shape)
    return np.ascontiguousarray(out), affine


def _nifti(arr: np.ndarray, affine: np.ndarray, dtype: str, descrip: str) -> nib.Nifti1Image:
    if dtype == "float32":
        img = nib.Nifti1Image(arr.astype(np.float32), affine)
    elif dtype == "int16_scaled":  # raw int16 * scl_slope, slope from the data (as some vendors)
        slope = float(f"{max(float(arr.max()), 1e-3) / 30000:.4g}")
        img = nib.Nifti1Image(np.clip(np.rint(arr / slope), 0, 32767).astype(np.int16), affine)
        img.header.set_slope_inter(slope, 0.0)
    elif dtype == "int16":
        img = nib.Nifti1Image(np.clip(np.rint(arr), -32768, 32767).astype(np.int16), affine)
    elif dtype == "uint8":
        img = nib.Nifti1Image(np.clip(np.rint(arr), 0, 255).astype(np.uint8), affine)
    else:
        raise ValueError(f"unknown storage dtype {dtype!r}")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip[:79].encode()
    return img


def save_subject(site: Site, subj: PhantomSubject, folder: Path) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None]:
    """Write ``sub-XXX.nii.gz`` (+ ``_mask``) in the site's orientation and dtype; return images."""
    p = site.profile
    arr, affine = to_storage(subj.image * p.scale, site.grid.affine, p.orientation)
    img = _nifti(arr, affine, p.dtype, f"medgen phantom site {site.name} {subj.id}")
    nib.save(img, folder / f"{subj.id}.nii.gz")
    mimg = None
    if subj.mask is not None:
        marr, _ = to_storage(subj.mask.astype(np.uint8), site.grid.affine, p.orientation)
        mimg = _nifti(marr, affine, "uint8", f"medgen phantom lesion mask {site.name} {subj.id}")
        nib.save(mimg, folder / f"{subj.id}_mask.nii.gz")
    return img, mimg


# --------------------------------------------------------------------------- cohort

_OURS = re.compile(r"sub-\d+(_mask)?\.nii\.gz")


@dataclass(frozen=True)
class Preview:
    """One overview panel: an axial slice of the stored image after ``nib.as_closest_canonical``,
    as a (Y, X) array (rows posterior->anterior, columns patient left->right), and its mask."""

    title: str
    image: np.ndarray  # (Y, X) float32, stored units
    mask: np.ndarray | None  # (Y, X) bool
    zooms: tuple[float, float]  # (dx, dy) mm


def _preview(subj: PhantomSubject, img: nib.Nifti1Image, mimg: nib.Nifti1Image | None) -> Preview:
    """Axial slice through the lesion's largest cross-section (middle slice when healthy)."""
    can = nib.as_closest_canonical(img)
    data = can.get_fdata(dtype=np.float32)
    mask = None
    if mimg is not None:
        mask = nib.as_closest_canonical(mimg).get_fdata(dtype=np.float32) > 0.5
        z = int(np.argmax(mask.sum((0, 1))))
        mask = mask[:, :, z].T
        title = f"{subj.id}  {subj.info['lesion_volume_ml']:.1f} ml {subj.info['kind']}"
    else:
        z = data.shape[2] // 2
        title = f"{subj.id}  healthy"
    dx, dy = (float(v) for v in can.header.get_zooms()[:2])
    return Preview(title, np.ascontiguousarray(data[:, :, z].T), mask, (dx, dy))


def _generate(site: Site, j: int, lesion: bool, folder: Path, width: int, preview: bool):
    """Make, save and forget one subject: returns (id, info, has_mask, Preview | None)."""
    subj = make_subject(site, j, lesion, id_width=width)
    img, mimg = save_subject(site, subj, folder)
    return subj.id, subj.info, mimg is not None, _preview(subj, img, mimg) if preview else None


def _shown(labels: list[bool], n: int = 4) -> set[int]:
    """Subjects in the overview: lesion subjects first, plus one healthy if there is one."""
    les = [j for j, x in enumerate(labels) if x]
    healthy = [j for j, x in enumerate(labels) if not x]
    k = min(len(les), n - 1 if healthy else n)
    return set(les[:k] + healthy[: n - k])


def synthesize_cohort(out_dir: Path, sites: list[str], subjects_per_site: int, seed: int,
                      lesion_fraction: float = 0.5) -> dict[str, Path]:
    """Write one folder per site under out_dir and return {site: folder}. Also writes out_dir/overview.png.

    Each site folder holds ``sub-XXX.nii.gz``, ``sub-XXX_mask.nii.gz`` (lesion subjects only) and
    ``manifest.csv`` (subject,image,mask,label; paths relative to the folder). ``cohort.json``
    records the parameters: profiles, seed, and per subject the label, anatomy (affine and
    deformation), and for lesions ``lesion_volume_ml`` (of the written mask), ``kind``
    (hypo/hyper), ``lesion_contrast`` (relative change of mean intensity inside the mask, before
    gamma/bias/noise), ``strength`` and each lesion's territory, hemisphere and MNI centre.
    Site ``i`` uses ``PROFILES[i % 4]`` (perturbed from i = 4 on). Deterministic for a seed.
    """
    out_dir = Path(out_dir)
    if not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be a non-empty list of unique names, got {sites!r}")
    if subjects_per_site < 1:
        raise ValueError(f"subjects_per_site must be >= 1, got {subjects_per_site}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
    previous = (out_dir / "cohort.json").exists()
    for name in sites:
        folder = out_dir / name
        if folder.is_dir() and not previous and any(folder.glob("*.nii*")):
            raise FileExistsError(f"{folder} holds NIfTI files that are not a phantom cohort; "
                                  "choose an empty output folder")
    width = max(3, len(str(subjects_per_site)))
    labels = [is_lesion_subject(j, lesion_fraction) for j in range(subjects_per_site)]
    shown = _shown(labels)
    folders = {name: out_dir / name for name in sites}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    all_sites = [make_site(name, i, seed) for i, name in enumerate(sites)]
    jobs = [(site, j) for site in all_sites for j in range(subjects_per_site)]
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        done = list(pool.map(lambda job: _generate(job[0], job[1], labels[job[1]], folders[job[0].name],
                                                   width, job[1] in shown), jobs))
    record = {"generator": "medgen.data.phantom", "format_version": 1,
              "template": "MNI ICBM-152 2009 (nilearn wheel), 1 mm", "seed": seed,
              "subjects_per_site": subjects_per_site, "lesion_fraction": lesion_fraction,
              "sites": []}
    previews: dict[str, list[Preview]] = {}
    for k, site in enumerate(all_sites):
        results = done[k * subjects_per_site:(k + 1) * subjects_per_site]
        folder = folders[site.name]
        written = {f"{sid}{suffix}.nii.gz" for sid, _, has_mask, _ in results
                   for suffix in (("", "_mask") if has_mask else ("",))}
        for stale in folder.iterdir():
            if _OURS.fullmatch(stale.name) and stale.name not in written:
                stale.unlink()
        with open(folder / "manifest.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["subject", "image", "mask", "label"])
            for sid, info, has_mask, _ in results:
                w.writerow([sid, f"{sid}.nii.gz", f"{sid}_mask.nii.gz" if has_mask else "", info["label"]])
        p = site.profile
        record["sites"].append({
            "site": site.name, "folder": site.name, "profile": asdict(p),
            "shape": list(_reorient_zooms(site.grid.shape, p.orientation)),
            "voxel_mm": list(_reorient_zooms(p.voxel_mm, p.orientation)),
            "subjects": [{"subject": sid, "image": f"{sid}.nii.gz",
                          "mask": f"{sid}_mask.nii.gz" if has_mask else None, **info}
                         for sid, info, has_mask, _ in results]})
        les_first = sorted((r for r in results if r[3] is not None), key=lambda r: not r[2])
        previews[site.name] = [r[3] for r in les_first]
    (out_dir / "cohort.json").write_text(json.dumps(record, indent=1) + "\n")
    write_overview(out_dir / "overview.png", previews, {s.name: s.profile for s in all_sites})
    return folders


# --------------------------------------------------------------------------- overview figure

def write_overview(path: Path, previews: dict[str, list[Preview]], profiles: dict[str, SiteProfile]) -> None:
    """PNG with one row per site (label: name and scanner profile) of axial slices, anterior up,
    patient right on the image right, lesion outlines in red."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot / global backend state

    ncol = max(len(v) for v in previews.values())
    fig = Figure(figsize=(2.3 * ncol + 1.7, 2.6 * len(previews)))
    axes = fig.subplots(len(previews), ncol, squeeze=False)
    for row, (name, items) in zip(axes, previews.items()):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        prof = profiles[name]
        row[0].set_ylabel(f"site {name}\n{prof.name}\n{prof.summary()}", fontsize=6.5,
                          rotation=0, ha="right", va="center", labelpad=4)
        for ax, pv in zip(row, items):
            ny, nx = pv.image.shape
            dx, dy = pv.zooms
            pos = pv.image[pv.image > 0]
            vmax = float(np.percentile(pos, 99.5)) if pos.size else 1.0
            ax.imshow(pv.image, cmap="gray", vmin=0, vmax=vmax, origin="lower",
                      extent=(0, nx * dx, 0, ny * dy), interpolation="nearest")
            if pv.mask is not None and pv.mask.any():
                ax.contour((np.arange(nx) + 0.5) * dx, (np.arange(ny) + 0.5) * dy,
                           pv.mask.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(pv.title, fontsize=7)
    fig.suptitle("medgen phantom cohort: axial slices, anterior up, patient right on image right",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
