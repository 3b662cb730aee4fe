"""Site discovery: which scans (and masks) a site folder holds.

Three layouts, tried in this order:

(a) **manifest** — ``manifest.csv`` or ``manifest.yaml`` in the folder, one row per scan with
    columns ``image`` (required), ``mask`` (lesion mask), ``brain_mask``, ``label``
    (``healthy``/``lesion``, or 0/1) and ``subject``; paths relative to the folder.
(b) **BIDS** — ``sub-*/[ses-*/]anat/*_<bids_suffix>.nii[.gz]``; masks under ``derivatives/``
    named after the scan's entities: ``*lesion*_mask.nii[.gz]`` (lesion) and
    ``*desc-brain*_mask.nii[.gz]`` (brain).
(c) **plain files** — every ``NAME.nii[.gz]`` is a scan; ``NAME<suffix>.nii[.gz]`` is its lesion
    mask for a suffix in ``data.lesion_mask_suffixes`` (``_mask``, ``_seg``, ``_lesion``) and
    ``NAME<data.brain_mask_suffix>`` (``_brainmask``) its brain mask.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from medgen.config import DataConfig
from medgen.data.errors import DataError

Label = Literal["healthy", "lesion"]
MANIFEST_COLUMNS = ("subject", "image", "mask", "brain_mask", "label")
_NIFTI = re.compile(r"\.nii(\.gz)?$")


@dataclass(frozen=True)
class Subject:
    """One scan of a site and its optional masks. ``label`` None means: from the lesion mask."""

    id: str
    image: Path
    lesion_mask: Path | None = None
    brain_mask: Path | None = None
    label: Label | None = None

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.image, self.lesion_mask, self.brain_mask) if p is not None]


@dataclass
class SiteListing:
    folder: Path
    layout: Literal["manifest", "bids", "plain"]
    subjects: list[Subject]
    problems: list[DataError]


def discover_site(folder: str | Path, cfg: DataConfig) -> SiteListing:
    """List the scans of a site folder. Raises DataError when the folder is missing or holds no scan;
    problems with single entries (a manifest row naming a missing file, a mask without a scan) are
    returned in ``problems`` so that one bad entry does not hide the others."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(folder, "site folder does not exist")
    if not folder.is_dir():
        raise DataError(folder, "is not a folder (a site is a folder of NIfTI scans)")
    manifests = [folder / n for n in ("manifest.csv", "manifest.yaml", "manifest.yml") if (folder / n).is_file()]
    if len(manifests) > 1:
        raise DataError(folder, f"holds {len(manifests)} manifests ({', '.join(m.name for m in manifests)}); keep one")
    if manifests:
        listing = _from_manifest(manifests[0])
    elif any(p.is_dir() for p in folder.glob("sub-*")):
        listing = _from_bids(folder, cfg)
    else:
        listing = _from_plain_files(folder, cfg)
    if not listing.subjects and not listing.problems:
        raise DataError(folder, f"no NIfTI scans found (layout: {listing.layout}); see the README for site layouts")
    return listing


def _label(value: object, where: Path, row: int) -> tuple[Label | None, DataError | None]:
    text = "" if value is None else str(value).strip().lower()
    if text in ("", "none", "nan"):
        return None, None
    if text in ("healthy", "0", "normal", "control"):
        return "healthy", None
    if text in ("lesion", "1", "stroke", "patient"):
        return "lesion", None
    return None, DataError(where, f"row {row}: label {value!r} is not one of healthy, lesion, 0, 1")


def _read_manifest_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            loaded = yaml.safe_load(path.read_text())
            rows = loaded.get("subjects") if isinstance(loaded, dict) else loaded
    except (OSError, UnicodeDecodeError, csv.Error, yaml.YAMLError) as e:
        raise DataError(path, f"cannot read manifest: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(path, "manifest must be a table (CSV) or a list of mappings (YAML)")
    if not rows:
        raise DataError(path, "manifest has no rows")
    unknown = sorted({str(k) for r in rows for k in r if k not in MANIFEST_COLUMNS})
    if unknown:
        raise DataError(path, f"unknown column(s) {unknown}; allowed: {', '.join(MANIFEST_COLUMNS)}")
    if "image" not in rows[0]:
        raise DataError(path, "manifest has no 'image' column")
    return rows


def _from_manifest(path: Path) -> SiteListing:
    folder = path.parent
    subjects, problems, seen = [], [], set()
    for row_no, row in enumerate(_read_manifest_rows(path), start=2 if path.suffix == ".csv" else 1):
        image_field = str(row.get("image") or "").strip()
        if not image_field:
            problems.append(DataError(path, f"row {row_no}: empty 'image'"))
            continue
        files = {}
        for column in ("image", "mask", "brain_mask"):
            value = str(row.get(column) or "").strip()
            if not value:
                files[column] = None
                continue
            file = (folder / value).resolve() if not Path(value).is_absolute() else Path(value)
            if not file.is_file():
                problems.append(DataError(file, f"listed in {path.name} row {row_no} ({column}) but does not exist"))
                file = None
            files[column] = file
        label, problem = _label(row.get("label"), path, row_no)
        if problem:
            problems.append(problem)
        if files["image"] is None or problem:
            continue
        subject_id = str(row.get("subject") or "").strip() or _stem(files["image"])
        if subject_id in seen:
            problems.append(DataError(path, f"row {row_no}: subject {subject_id!r} appears twice"))
            continue
        seen.add(subject_id)
        subjects.append(Subject(subject_id, files["image"], files["mask"], files["brain_mask"], label))
    return SiteListing(folder, "manifest", subjects, problems)


def _stem(path: Path) -> str:
    return _NIFTI.sub("", path.name)


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _NIFTI.search(p.name))


def _from_plain_files(folder: Path, cfg: DataConfig) -> SiteListing:
    files = {_stem(p): p for p in _nifti_files(folder)}
    # Longest suffix first, so that "_brainmask" is not read as "_mask" of "sub-01_brain".
    suffixes = sorted([(s, "lesion") for s in cfg.lesion_mask_suffixes] + [(cfg.brain_mask_suffix, "brain")],
                      key=lambda s: -len(s[0]))
    masks: dict[str, dict[str, Path]] = {}
    for stem, path in files.items():
        for suffix, kind in suffixes:
            if stem.endswith(suffix) and len(stem) > len(suffix):
                masks.setdefault(stem[: -len(suffix)], {})[kind] = path
                break
    mask_paths = {p for m in masks.values() for p in m.values()}
    subjects = [
        Subject(stem, path, masks.get(stem, {}).get("lesion"), masks.get(stem, {}).get("brain"))
        for stem, path in files.items() if path not in mask_paths
    ]
    problems = [
        DataError(path, f"looks like a mask of {owner!r} but there is no scan {owner}.nii[.gz]")
        for owner, found in masks.items() if owner not in files for path in found.values()
    ]
    return SiteListing(folder, "plain", subjects, problems)


def _from_bids(folder: Path, cfg: DataConfig) -> SiteListing:
    derivatives = [p for p in (folder / "derivatives").rglob("*") if p.is_file() and _NIFTI.search(p.name)] \
        if (folder / "derivatives").is_dir() else []
    subjects, problems = [], []
    pattern = f"_{cfg.bids_suffix}"
    for scan in sorted(folder.glob("sub-*/anat/*.nii*")) + sorted(folder.glob("sub-*/ses-*/anat/*.nii*")):
        stem = _stem(scan)
        if not stem.endswith(pattern):
            continue
        entities = stem[: -len(pattern)]
        mine = [p for p in derivatives if _stem(p).startswith(entities + "_") and _stem(p).endswith("_mask")]
        lesion = [p for p in mine if "lesion" in p.name]
        brain = [p for p in mine if "desc-brain" in p.name]
        for kind, found in (("lesion", lesion), ("brain", brain)):
            if len(found) > 1:
                problems.append(DataError(scan, f"{len(found)} {kind} masks under derivatives/: "
                                                f"{', '.join(p.name for p in found)}; keep one"))
        if len(lesion) > 1 or len(brain) > 1:
            continue
        subjects.append(Subject(entities, scan, lesion[0] if lesion else None, brain[0] if brain else None))
    return SiteListing(folder, "bids", subjects, problems)
