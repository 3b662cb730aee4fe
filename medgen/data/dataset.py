"""A site's preprocessed axial slices, cached on disk, and the torch Dataset over them.

``load_site`` turns a site folder into a :class:`SiteSlices`. Each scan's slices are cached
in ``<cache>/<site>-<folder hash>/<scan id>-<key>.npz``; the key covers the preprocessing part of
the data config and the path, size and modification time of every file of the scan, so a
re-run reuses the cache and a changed config or file re-processes just what changed (the
``ENTRIES_PER_SCAN`` most recently used entries of a scan are kept). The headers
are checked on every run, cached or not, so that header limits (``data.max_voxels``) always apply.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medgen.config import DataConfig
from medgen.data import brain_mask, parallel
from medgen.data.errors import DataError, SiteDataError
from medgen.data.nifti import MIN_BRAIN_EXTENT_MM, inspect_header, load_lesion_mask, load_mask, load_volume
from medgen.data.plausibility import (brain_off_head_problem, grid_mismatch_warning, label_map_problem,
                                      lesion_coverage_problem)
from medgen.data.preprocess import SubjectSlices, preprocess_subject
from medgen.data.sites import Scan, discover_site
from medgen.fileio import atomic_write
from medgen.progress import track

HEALTHY, LESION = 0, 1
# Cache entries kept per scan, the most recently used first: two settings used in turn (a 64-px
# study and a 32-px test, with and without N4) do not re-process each other's slices; a scan's
# file that changed leaves at most this many entries behind.
ENTRIES_PER_SCAN = 2
# Bump when preprocessing changes in a way the config does not show, to invalidate old caches.
PIPELINE_VERSION = 3
_CACHE_KEYS = ("image_size", "spacing_mm", "volume_index", "percentiles", "min_brain_fraction", "lesion_labels",
               "bias_correction")


@dataclass
class SiteSlices:
    """All usable slices of one site. N slices of S×S pixels.

    images: (N, S, S) float32 in [0, 1], 0 outside the brain
    brain, lesion: (N, S, S) bool
    labels: (N,) int64, 0 healthy / 1 lesion (slice level: the slice holds lesion pixels)
    subjects: (N,) str subject (patient) id: the unit of the split and of subject-level DP
    slice_index: (N,) axial index in the resampled volume
    scans: (N,) str scan id (a subject may have several scans: sessions, runs); default: ``subjects``
    warnings: odd but usable entries (a qform/sform disagreement, a folder named like NIfTI)
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
    scans: np.ndarray | None = None
    warnings: list[DataError] = field(default_factory=list)

    def __post_init__(self):
        if self.scans is None:
            self.scans = self.subjects

    def __len__(self) -> int:
        return len(self.images)

    @property
    def lesion_subjects(self) -> list[str]:
        return sorted(set(self.subjects[self.labels == LESION].tolist()))

    def subset(self, keep: np.ndarray) -> SiteSlices:
        """The slices where ``keep`` (bool (N,) or indices) holds; problems, notes and warnings carried over."""
        return SiteSlices(self.site, self.images[keep], self.brain[keep], self.lesion[keep], self.labels[keep],
                          self.subjects[keep], self.slice_index[keep], self.problems, self.notes,
                          self.scans[keep], self.warnings)

    def split_subjects(self, val_fraction: float, seed: int) -> tuple[SiteSlices, SiteSlices]:
        """(train, validation) split by subject (patient), never by slice or scan (slices and scans
        of one patient are not independent). Deterministic for (seed, subject ids); lesion and
        healthy subjects are split separately so both keep their share. With fewer than 2 subjects
        of a kind, all go to train."""
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
                      problems=[e for p in parts for e in p.problems], notes=[n for p in parts for n in p.notes],
                      scans=np.concatenate([p.scans for p in parts]),
                      warnings=[w for p in parts for w in p.warnings])


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
    SiteDataError; with ``"skip"`` the good scans are used and the bad ones listed in ``problems``
    (a problem with a mask names the mask and the scan skipped with it).
    A site with no usable slice raises SiteDataError either way.
    """
    folder = Path(folder).resolve()
    site = site or folder.name
    listing = discover_site(folder, cfg)
    problems = list(listing.problems)
    warnings = list(listing.warnings)
    notes: list[str] = list(listing.notes)
    cache = cache_root(cfg) / f"{site}-{hashlib.sha256(str(folder).encode()).hexdigest()[:10]}"
    parts: list[tuple[Scan, SubjectSlices]] = []
    outcomes = _outcomes(listing.scans, cfg, cache)
    for scan in track(listing.scans, f"site {site}: preprocessing", unit="scans"):
        outcome = next(outcomes)
        if isinstance(outcome, DataError):
            problems.append(_naming_scan(outcome, scan))
            continue
        scan_warnings, slices = outcome
        warnings += scan_warnings
        if len(slices.images) == 0:
            problems.append(DataError(scan.image, "no axial slice with enough brain "
                                                  f"(data.min_brain_fraction={cfg.min_brain_fraction})"))
            continue
        if scan.label == "lesion" and scan.lesion_mask is None:
            notes.append(f"{scan.id}: labelled lesion without a lesion mask; all its slices are labelled lesion")
        elif scan.lesion_mask is not None and not slices.lesion.any():
            notes.append(f"{scan.id}: its lesion mask falls outside the slices kept (or is below one pixel)")
        if scan.lesion_mask is not None and (wrong := lesion_coverage_problem(scan.lesion_mask, slices.lesion,
                                                                             slices.brain)):
            problems.append(_naming_scan(wrong, scan))
            continue
        parts.append((scan, slices))
    notes += _brain_mask_notes([scan for scan, _ in parts], cfg)
    if problems and cfg.on_bad_file == "fail":
        raise SiteDataError(folder, problems)
    if not parts:
        raise SiteDataError(folder, problems or [DataError(folder, "no usable scan")])
    return _assemble(site, parts, cfg, problems, notes, warnings)


def _brain_mask_notes(scans: list[Scan], cfg: DataConfig) -> list[str]:
    """Which brain masks the site's usable scans got: supplied, or the method data.brain_mask chose."""
    estimated = sum(scan.brain_mask is None for scan in scans)
    if not estimated:
        return []
    method, fallback = brain_mask.resolve(cfg.brain_mask)
    name = "deepbet model" if method == brain_mask.MODEL else "threshold (Otsu) estimate"
    notes = [f"brain masks: {len(scans) - estimated} supplied, {estimated} by the {name} "
             f"(data.brain_mask={cfg.brain_mask})"]
    return notes + ([fallback] if fallback else [])


def check_headers(scan: Scan, cfg: DataConfig) -> list[DataError]:
    """Header-only checks of every file of a scan (:func:`~medgen.data.nifti.inspect_header`): raises
    DataError for a refused header, returns the warnings (e.g. qform and sform disagree, a mask on
    another subject's grid)."""
    warnings = [DataError(path, w) for path in scan.files for w in inspect_header(path, cfg.max_voxels)]
    masks = [m for m in (scan.lesion_mask, scan.brain_mask) if m is not None]
    return warnings + [w for m in masks if (w := grid_mismatch_warning(scan.image, m)) is not None]


def _naming_scan(error: DataError, scan: Scan) -> DataError:
    """A problem with a mask, saying which scan is skipped with it."""
    if error.path == scan.image:
        return error
    return DataError(error.path, f"{error.problem} (scan {scan.image.name} not used)")


def _assemble(site: str, parts: list[tuple[Scan, SubjectSlices]], cfg: DataConfig,
              problems: list[DataError], notes: list[str], warnings: list[DataError]) -> SiteSlices:
    labels = []
    for scan, s in parts:
        has_lesion = s.lesion.reshape(len(s.lesion), -1).sum(1) >= cfg.min_lesion_pixels
        if scan.label == "lesion" and scan.lesion_mask is None:
            has_lesion = np.ones(len(s.images), bool)
        labels.append(np.where(has_lesion, LESION, HEALTHY).astype(np.int64))
    return SiteSlices(
        site=site,
        images=np.concatenate([s.images for _, s in parts]),
        brain=np.concatenate([s.brain for _, s in parts]),
        lesion=np.concatenate([s.lesion for _, s in parts]),
        labels=np.concatenate(labels),
        subjects=np.concatenate([np.full(len(s.images), scan.subject) for scan, s in parts]),
        slice_index=np.concatenate([s.slice_index for _, s in parts]),
        problems=problems,
        notes=notes,
        scans=np.concatenate([np.full(len(s.images), scan.id) for scan, s in parts]),
        warnings=warnings,
    )


def _cache_key(scan: Scan, cfg: DataConfig) -> str:
    files = []
    for path in scan.files:
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    settings = {k: getattr(cfg, k) for k in _CACHE_KEYS}
    if scan.brain_mask is None:  # the method data.brain_mask resolves to here, not the setting ("auto")
        settings["brain_mask"] = brain_mask.cache_tag(brain_mask.resolve(cfg.brain_mask)[0])
    blob = json.dumps([PIPELINE_VERSION, settings, files, scan.label], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _outcomes(scans: list[Scan], cfg: DataConfig, cache: Path) -> Iterator[tuple[list[DataError], SubjectSlices]
                                                                          | DataError]:
    """Each scan's header warnings and slices, or its DataError, in order. Scans not in the cache yet
    are preprocessed ``data.workers`` at a time (medgen/data/parallel.py)."""
    work = functools.partial(_outcome, cfg=cfg, cache=cache)
    fresh = [scan for scan in scans if not _in_cache(scan, cfg, cache)]
    done = parallel.ordered_map(work, fresh, parallel.workers(cfg.workers))
    fresh_ids = {id(scan) for scan in fresh}
    for scan in scans:
        yield next(done) if id(scan) in fresh_ids else work(scan)


def _outcome(scan: Scan, cfg: DataConfig, cache: Path) -> tuple[list[DataError], SubjectSlices] | DataError:
    try:
        return check_headers(scan, cfg), _cached_scan(scan, cfg, cache)
    except DataError as e:
        return e


def _cache_entry(scan: Scan, cfg: DataConfig, cache: Path) -> Path:
    """Where the scan's slices are cached; DataError when one of its files is missing."""
    for path in scan.files:
        if not path.is_file():
            raise DataError(path, "file does not exist")
    return cache / f"{_safe_id(scan)}-{_cache_key(scan, cfg)}.npz"


def _safe_id(scan: Scan) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in scan.id)


def _in_cache(scan: Scan, cfg: DataConfig, cache: Path) -> bool:
    """Cached, or nothing to preprocess (a missing file: its DataError comes at once)."""
    try:
        return _cache_entry(scan, cfg, cache).is_file()
    except DataError:
        return True


def _cached_scan(scan: Scan, cfg: DataConfig, cache: Path) -> SubjectSlices:
    target, safe_id = _cache_entry(scan, cfg, cache), _safe_id(scan)
    if target.is_file():
        try:
            with np.load(target) as z:
                slices = SubjectSlices(z["images"], z["brain"], z["lesion"], z["slice_index"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            target.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
        else:
            with contextlib.suppress(OSError):
                os.utime(target)  # the most recently used entries are the ones kept
            return slices
    slices = _preprocess(scan, cfg)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda f: np.savez(f, images=slices.images, brain=slices.brain, lesion=slices.lesion,
                                            slice_index=slices.slice_index))
    entries = sorted((e for e in cache.glob(f"{safe_id}-*.npz") if _is_entry_of(e.name, safe_id) and e != target),
                     key=lambda e: e.stat().st_mtime_ns, reverse=True)
    for stale in entries[ENTRIES_PER_SCAN - 1:]:
        stale.unlink(missing_ok=True)
    return slices


def _is_entry_of(name: str, safe_id: str) -> bool:
    """Is ``name`` a cache entry (``<safe_id>-<16 hex>.npz``) of this scan, not of a scan whose id
    merely starts with ``<safe_id>-``?"""
    key = name[len(safe_id) + 1: -len(".npz")]
    return len(key) == 16 and all(c in "0123456789abcdef" for c in key)


def _preprocess(scan: Scan, cfg: DataConfig) -> SubjectSlices:
    image = load_volume(scan.image, cfg.volume_index, cfg.max_voxels, min_extent_mm=MIN_BRAIN_EXTENT_MM)
    if (wrong := label_map_problem(image)) is not None:
        raise wrong
    lesion = load_lesion_mask(scan.lesion_mask, cfg.volume_index, cfg.lesion_labels, cfg.max_voxels) \
        if scan.lesion_mask else None
    brain = load_mask(scan.brain_mask, cfg.volume_index, cfg.max_voxels) if scan.brain_mask else None
    if lesion is not None:
        if scan.label == "lesion" and not lesion.data.any():
            raise DataError(lesion.path, f"lesion mask is empty but scan {scan.id!r} is labelled lesion")
        if scan.label == "healthy" and lesion.data.any():
            raise DataError(lesion.path, f"lesion mask is not empty but scan {scan.id!r} is labelled healthy")
    if brain is not None and not brain.data.any():
        raise DataError(brain.path, "brain mask is empty")
    if brain is not None and (wrong := brain_off_head_problem(image, brain)) is not None:
        raise wrong
    return preprocess_subject(image, cfg, lesion=lesion, brain=brain)
