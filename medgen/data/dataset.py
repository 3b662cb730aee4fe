"""A site's preprocessed axial slices, cached on disk, and the torch Dataset over them.

``load_site`` turns a site folder into a :class:`SiteSlices`. Each subject's slices are cached
in ``<cache>/<site>-<folder hash>/<subject>-<key>.npz``; the key covers the preprocessing part of
the data config and the path, size and modification time of every file of the subject, so a
re-run reuses the cache and a changed config or file re-processes just what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medgen.config import DataConfig
from medgen.data.errors import DataError, SiteDataError
from medgen.data.nifti import load_mask, load_volume
from medgen.data.preprocess import SubjectSlices, preprocess_subject
from medgen.data.sites import Subject, discover_site
from medgen.fileio import atomic_write

HEALTHY, LESION = 0, 1
# Bump when preprocessing changes in a way the config does not show, to invalidate old caches.
PIPELINE_VERSION = 1
_CACHE_KEYS = ("image_size", "spacing_mm", "volume_index", "percentiles", "min_brain_fraction")


@dataclass
class SiteSlices:
    """All usable slices of one site. N slices of S×S pixels.

    images: (N, S, S) float32 in [0, 1], 0 outside the brain
    brain, lesion: (N, S, S) bool
    labels: (N,) int64, 0 healthy / 1 lesion (slice level: the slice holds lesion pixels)
    subjects: (N,) str subject id; slice_index: (N,) axial index in the resampled volume
    """

    site: str
    images: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray
    labels: np.ndarray
    subjects: np.ndarray
    slice_index: np.ndarray
    problems: list[DataError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def lesion_subjects(self) -> list[str]:
        return sorted(set(self.subjects[self.labels == LESION].tolist()))

    def subset(self, keep: np.ndarray) -> SiteSlices:
        """The slices where ``keep`` (bool (N,) or indices) holds; problems and notes carried over."""
        return SiteSlices(self.site, self.images[keep], self.brain[keep], self.lesion[keep], self.labels[keep],
                          self.subjects[keep], self.slice_index[keep], self.problems, self.notes)

    def split_subjects(self, val_fraction: float, seed: int) -> tuple[SiteSlices, SiteSlices]:
        """(train, validation) split by subject, never by slice (slices of one subject are not
        independent). Deterministic for (seed, subject ids); lesion and healthy subjects are split
        separately so both keep their share. With fewer than 2 subjects of a kind, all go to train."""
        rng = np.random.default_rng(seed)
        val: list[str] = []
        for lesion_kind in (True, False):
            ids = sorted(s for s in set(self.subjects.tolist()) if (s in self.lesion_subjects) == lesion_kind)
            n_val = int(round(val_fraction * len(ids))) if len(ids) >= 2 else 0
            val += [ids[i] for i in rng.permutation(len(ids))[:n_val]]
        in_val = np.isin(self.subjects, val)
        return self.subset(~in_val), self.subset(in_val)


def concat_slices(parts: list[SiteSlices], site: str) -> SiteSlices:
    """Several sites' slices pooled into one (``site`` names the pool)."""
    return SiteSlices(site, *(np.concatenate([getattr(p, k) for p in parts])
                              for k in ("images", "brain", "lesion", "labels", "subjects", "slice_index")),
                      problems=[e for p in parts for e in p.problems], notes=[n for p in parts for n in p.notes])


class SliceDataset(torch.utils.data.Dataset):
    """Torch view of a site: item = (image (1, S, S) float32 in [0, 1], label int64, brain (1, S, S)
    bool, lesion (1, S, S) bool)."""

    def __init__(self, slices: SiteSlices):
        self.images = torch.from_numpy(slices.images).unsqueeze(1)
        self.labels = torch.from_numpy(slices.labels)
        self.brain = torch.from_numpy(slices.brain).unsqueeze(1)
        self.lesion = torch.from_numpy(slices.lesion).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], self.brain[i], self.lesion[i]


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir)
    env = os.environ.get("MEDGEN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "medgen"


def load_site(folder: str | Path, cfg: DataConfig, site: str | None = None) -> SiteSlices:
    """Preprocess (or read from cache) every scan of a site folder.

    Bad files: with ``cfg.on_bad_file == "fail"`` all problems found are raised together as
    SiteDataError; with ``"skip"`` the good scans are used and the bad ones listed in ``problems``.
    A site with no usable slice raises SiteDataError either way.
    """
    folder = Path(folder).resolve()
    site = site or folder.name
    listing = discover_site(folder, cfg)
    problems = list(listing.problems)
    notes: list[str] = []
    cache = cache_root(cfg) / f"{site}-{hashlib.sha256(str(folder).encode()).hexdigest()[:10]}"
    parts: list[tuple[Subject, SubjectSlices]] = []
    for subject in listing.subjects:
        try:
            slices = _cached_subject(subject, cfg, cache)
        except DataError as e:
            problems.append(e)
            continue
        if len(slices.images) == 0:
            problems.append(DataError(subject.image, "no axial slice with enough brain "
                                                     f"(data.min_brain_fraction={cfg.min_brain_fraction})"))
            continue
        if subject.label == "lesion" and subject.lesion_mask is None:
            notes.append(f"{subject.id}: labelled lesion without a lesion mask; all its slices are labelled lesion")
        elif subject.lesion_mask is not None and not slices.lesion.any():
            notes.append(f"{subject.id}: its lesion mask falls outside the slices kept (or is below one pixel)")
        parts.append((subject, slices))
    if problems and cfg.on_bad_file == "fail":
        raise SiteDataError(folder, problems)
    if not parts:
        raise SiteDataError(folder, problems or [DataError(folder, "no usable scan")])
    return _assemble(site, parts, cfg, problems, notes)


def _assemble(site: str, parts: list[tuple[Subject, SubjectSlices]], cfg: DataConfig,
              problems: list[DataError], notes: list[str]) -> SiteSlices:
    labels = []
    for subject, s in parts:
        has_lesion = s.lesion.reshape(len(s.lesion), -1).sum(1) >= cfg.min_lesion_pixels
        if subject.label == "lesion" and subject.lesion_mask is None:
            has_lesion = np.ones(len(s.images), bool)
        labels.append(np.where(has_lesion, LESION, HEALTHY).astype(np.int64))
    return SiteSlices(
        site=site,
        images=np.concatenate([s.images for _, s in parts]),
        brain=np.concatenate([s.brain for _, s in parts]),
        lesion=np.concatenate([s.lesion for _, s in parts]),
        labels=np.concatenate(labels),
        subjects=np.concatenate([np.full(len(s.images), subj.id) for subj, s in parts]),
        slice_index=np.concatenate([s.slice_index for _, s in parts]),
        problems=problems,
        notes=notes,
    )


def _cache_key(subject: Subject, cfg: DataConfig) -> str:
    files = []
    for path in subject.files:
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    settings = {k: getattr(cfg, k) for k in _CACHE_KEYS}
    blob = json.dumps([PIPELINE_VERSION, settings, files, subject.label], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_subject(subject: Subject, cfg: DataConfig, cache: Path) -> SubjectSlices:
    for path in subject.files:
        if not path.is_file():
            raise DataError(path, "file does not exist")
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in subject.id)
    target = cache / f"{safe_id}-{_cache_key(subject, cfg)}.npz"
    if target.is_file():
        try:
            with np.load(target) as z:
                return SubjectSlices(z["images"], z["brain"], z["lesion"], z["slice_index"])
        except (OSError, ValueError, KeyError, EOFError):
            target.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    slices = _preprocess(subject, cfg)
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f"{safe_id}-*.npz"):
        stale.unlink(missing_ok=True)
    atomic_write(target, lambda f: np.savez(f, images=slices.images, brain=slices.brain, lesion=slices.lesion,
                                            slice_index=slices.slice_index))
    return slices


def _preprocess(subject: Subject, cfg: DataConfig) -> SubjectSlices:
    image = load_volume(subject.image, cfg.volume_index)
    lesion = load_mask(subject.lesion_mask, cfg.volume_index) if subject.lesion_mask else None
    brain = load_mask(subject.brain_mask, cfg.volume_index) if subject.brain_mask else None
    if lesion is not None:
        if subject.label == "lesion" and not lesion.data.any():
            raise DataError(lesion.path, f"lesion mask is empty but subject {subject.id!r} is labelled lesion")
        if subject.label == "healthy" and lesion.data.any():
            raise DataError(lesion.path, f"lesion mask is not empty but subject {subject.id!r} is labelled healthy")
    if brain is not None and not brain.data.any():
        raise DataError(brain.path, "brain mask is empty")
    return preprocess_subject(image, cfg, lesion=lesion, brain=brain)
