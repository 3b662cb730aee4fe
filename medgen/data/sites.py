"""Site discovery: which scans (and masks) a site folder holds.

Three layouts, tried in this order:

(a) **manifest** — ``manifest.csv`` or ``manifest.yaml`` in the folder, one row per scan with
    columns ``image`` (required), ``mask`` (lesion mask), ``brain_mask``, ``label``
    (``healthy``/``lesion``, or 0/1) and ``subject`` (rows of one subject are one patient);
    paths relative to the folder and inside it (unless ``data.allow_external_paths``).
(b) **BIDS** — ``[rawdata/]sub-*/[ses-*/]<datatype>/*_<bids_suffix>.nii[.gz]`` for any
    datatype folder (``anat``, ``dwi``, ``perf``, ...), or BIDS-named files side by side in the
    folder itself (``sub-01_ses-1_dwi.nii.gz``, as the ISLES challenge distributes a case); the
    subject is ``sub-<label>`` (its sessions and runs are scans of one patient). Masks, under
    ``derivatives/`` (of the folder or of ``rawdata/``) or beside the scans, carry a subset of the
    scan's entities and the suffix ``_mask`` or ``_msk``: ``*lesion*`` or ``_msk`` is a lesion
    mask, ``*desc-brain*`` / ``*label-brain*`` a brain mask. When no scan has ``data.bids_suffix``
    the error names the contrasts that are there.
(c) **plain files** — every ``NAME.nii[.gz]`` is a scan (and its own subject);
    ``NAME<suffix>.nii[.gz]`` is its lesion mask for a suffix in ``data.lesion_mask_suffixes``
    (``_mask``, ``_seg``, ``_lesion``) and ``NAME<data.brain_mask_suffix>`` (``_brainmask``) its
    brain mask.

File extensions are matched case-insensitively. Entries named like NIfTI that are not files
(folders, broken or looping symlinks) are reported, never silently skipped.

Manifest columns other than MANIFEST_COLUMNS (``age``, ``sex``, ...) are kept in the file and
ignored here; the listing's ``notes`` names them once.

Each scan has an ``id`` unique in the site (its slice-cache entry, notes) and a ``subject``: the
patient it belongs to, the unit of the train/validation split and of DP's ``privacy.unit: subject``.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from medgen.config import DataConfig
from medgen.data.errors import DataError
from medgen.data.nifti import file_problem

Label = Literal["healthy", "lesion"]
MANIFEST_COLUMNS = ("subject", "image", "mask", "brain_mask", "label")
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Scan:
    """One scan of a site and its optional masks. ``id`` is unique per scan in the site;
    ``subject`` is the patient (default: ``id``). ``label`` None means: from the lesion mask."""

    id: str
    image: Path
    lesion_mask: Path | None = None
    brain_mask: Path | None = None
    label: Label | None = None
    subject: str = ""
    contrast: str = ""  # the BIDS suffix ("T1w", "dwi") or a contrast word ending a plain name ("T1"); "" unknown

    def __post_init__(self):
        if not self.subject:
            object.__setattr__(self, "subject", self.id)

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.image, self.lesion_mask, self.brain_mask) if p is not None]


@dataclass
class SiteListing:
    """The scans of a site folder; ``problems``: entries that cannot be used (a missing file, a mask
    without its scan, a broken symlink); ``warnings``: entries skipped that may be intended (a
    folder named like a NIfTI file)."""

    folder: Path
    layout: Literal["manifest", "bids", "plain"]
    scans: list[Scan]
    problems: list[DataError]
    warnings: list[DataError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
        listing = _from_manifest(manifests[0], cfg)
    elif (root := _bids_root(folder)) is not None:
        listing = _from_bids(folder, root, cfg)
    elif _is_flat_bids(folder):
        listing = _from_bids(folder, None, cfg)
    else:
        listing = _from_plain_files(folder, cfg)
    if not listing.scans and not listing.problems:
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


def _read_manifest_rows(path: Path) -> tuple[list[dict], list[str]]:
    """(the rows, the names of the columns medgen does not use, sorted)."""
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
    if "image" not in rows[0]:
        raise DataError(path, f"manifest has no 'image' column (its columns: {', '.join(map(str, rows[0]))}; "
                              f"medgen uses {', '.join(MANIFEST_COLUMNS)})")
    return rows, sorted({str(k) for r in rows for k in r if k not in MANIFEST_COLUMNS})


def _manifest_file(manifest: Path, row_no: int, column: str, value: str,
                   cfg: DataConfig) -> tuple[Path | None, DataError | None]:
    """The file a manifest cell names, as named in the folder: (path, None), or (None, the
    problem) when its path leads outside the site folder (``../``, an absolute path elsewhere;
    unless ``data.allow_external_paths``) or is not a readable file. A symlink inside the folder
    is followed wherever it points: the site put it there, as it wrote the manifest."""
    folder = manifest.parent.resolve()
    where = f"listed in {manifest.name} row {row_no} ({column})"
    named = Path(os.path.normpath(folder / value))
    if not cfg.allow_external_paths and not named.is_relative_to(folder):
        return None, DataError(manifest, f"row {row_no} ({column}): {value!r} leads outside the site folder "
                                         f"({named}); set data.allow_external_paths: true to allow it")
    try:
        named.resolve(strict=False)
    except (RuntimeError, OSError):  # a symlink loop
        return None, DataError(folder / value, f"{where} but is a symlink loop")
    problem = file_problem(folder / value)
    if problem is not None:
        return None, DataError(problem.path, f"{where} but {problem.problem}")
    return named, None


def _from_manifest(path: Path, cfg: DataConfig) -> SiteListing:
    folder = path.parent
    scans, problems, seen = [], [], set()
    rows, ignored = _read_manifest_rows(path)
    notes = [f"{path.name}: column(s) {', '.join(ignored)} ignored (medgen uses {', '.join(MANIFEST_COLUMNS)})"] \
        if ignored else []
    for row_no, row in enumerate(rows, start=2 if path.suffix == ".csv" else 1):
        image_field = str(row.get("image") or "").strip()
        if not image_field:
            problems.append(DataError(path, f"row {row_no}: empty 'image'"))
            continue
        files, row_problems = {}, []
        for column in ("image", "mask", "brain_mask"):
            value = str(row.get(column) or "").strip()
            files[column], problem = _manifest_file(path, row_no, column, value, cfg) if value else (None, None)
            row_problems += [problem] if problem else []
        label, problem = _label(row.get("label"), path, row_no)
        row_problems += [problem] if problem else []
        problems += row_problems
        if row_problems:  # a row is used whole or not at all: never a lesion scan without its mask
            continue
        scan_id = _scan_id(files["image"], folder.resolve())
        if (real := files["image"].resolve()) in seen:  # also one file named twice through a link
            problems.append(DataError(path, f"row {row_no}: image {image_field!r} appears twice"))
            continue
        seen.add(real)
        subject = str(row.get("subject") or "").strip() or _stem(files["image"])
        scans.append(Scan(scan_id, files["image"], files["mask"], files["brain_mask"], label, subject,
                          plain_contrast(_stem(files["image"]))))
    return SiteListing(folder, "manifest", scans, problems, notes=notes)


def _scan_id(image: Path, folder: Path) -> str:
    """A manifest scan's id: its image path relative to the site folder, without the extension."""
    try:
        relative = image.relative_to(folder)
    except ValueError:
        relative = image
    return _NIFTI.sub("", relative.as_posix()).lstrip("/")


def _stem(path: Path) -> str:
    return _NIFTI.sub("", path.name)


def _nifti_entries(folder: Path) -> tuple[list[Path], list[DataError], list[DataError]]:
    """(NIfTI files, problems, warnings) among the entries of ``folder`` named like NIfTI: broken or
    looping symlinks and other unreadable entries are problems, folders are warnings."""
    files, problems, warnings = [], [], []
    if not folder.is_dir():
        return files, problems, warnings
    for entry in sorted(folder.iterdir()):
        if not _NIFTI.search(entry.name):
            continue
        problem = file_problem(entry)
        if problem is None:
            files.append(entry)
        elif entry.is_dir():
            warnings.append(DataError(entry, "a folder named like a NIfTI file; skipped"))
        else:
            problems.append(DataError(entry, f"named like a NIfTI file but {problem.problem}; skipped"))
    return files, problems, warnings


def _from_plain_files(folder: Path, cfg: DataConfig) -> SiteListing:
    found, problems, warnings = _nifti_entries(folder)
    unreadable = {p.path for p in problems}
    files = {_stem(p): p for p in found}
    # Longest suffix first, so that "_brainmask" is not read as "_mask" of "sub-01_brain".
    suffixes = sorted([(s, "lesion") for s in cfg.lesion_mask_suffixes] + [(cfg.brain_mask_suffix, "brain")],
                      key=lambda s: -len(s[0]))
    masks: dict[str, dict[str, Path]] = {}
    for path in [*found, *unreadable]:
        stem = _stem(path)
        for suffix, kind in suffixes:
            if stem.endswith(suffix) and len(stem) > len(suffix):
                masks.setdefault(stem[: -len(suffix)], {})[kind] = path
                break
    mask_paths = {p for m in masks.values() for p in m.values()}
    scans = []
    for stem, path in files.items():
        mine = masks.get(stem, {})
        if path in mask_paths:
            continue
        if _unreadable_mask(path, list(mine.values()), unreadable, problems):
            continue
        scans.append(Scan(stem, path, mine.get("lesion"), mine.get("brain"), contrast=plain_contrast(stem)))
    problems += [
        DataError(path, f"looks like a mask of {owner!r} but there is no scan {owner}.nii[.gz]")
        for owner, found in masks.items() if owner not in files for path in found.values() if path not in unreadable
    ]
    return SiteListing(folder, "plain", scans, problems, warnings)


def _unreadable_mask(scan: Path, masks: list[Path], unreadable: set[Path], problems: list[DataError]) -> bool:
    """Is one of a scan's masks an unreadable entry (a broken symlink)? Then the scan is not used,
    rather than used without its mask, and ``problems`` says so."""
    bad = [m for m in masks if m in unreadable]
    if bad:
        problems.append(DataError(scan, f"not used: its mask {bad[0].name} cannot be read"))
    return bool(bad)


def _bids_root(folder: Path) -> Path | None:
    """The folder holding the ``sub-*`` folders: ``folder`` itself or its ``rawdata/``; None if neither."""
    for root in (folder, folder / "rawdata"):
        if any(p.is_dir() for p in root.glob("sub-*")):
            return root
    return None


def _is_flat_bids(folder: Path) -> bool:
    """Are all NIfTI files of ``folder`` BIDS-named (``sub-<label>[_<key>-<value>...]_<suffix>``)
    and is at least one of them not a mask? (A plain site's ``sub-01.nii.gz`` has no suffix.)"""
    names = [bids_name(_stem(p)) for p in _nifti_entries(folder)[0]]
    return bool(names) and all(names) and any(n[1] not in BIDS_MASK_SUFFIXES for n in names)


BIDS_MASK_SUFFIXES = ("mask", "msk")
_ENTITY = re.compile(r"^[A-Za-z]+-[A-Za-z0-9]+$")
_SUFFIX = re.compile(r"^[A-Za-z0-9]+$")
# Entities that describe a derivative, not which scan it belongs to.
_DERIVATIVE_ENTITIES = {"desc", "label", "space", "res", "den", "from", "to", "mod", "hemi", "seg", "atlas"}


def bids_name(stem: str) -> tuple[dict[str, str], str] | None:
    """``sub-01_ses-2_dwi`` -> ({"sub": "01", "ses": "2"}, "dwi"); None when not BIDS-named."""
    parts = stem.split("_")
    if len(parts) < 2 or not parts[0].startswith("sub-") or not _SUFFIX.match(parts[-1]):
        return None
    if not all(_ENTITY.match(p) for p in parts[:-1]):
        return None
    return dict(p.split("-", 1) for p in parts[:-1]), parts[-1]


# Contrast words a plain file name may end in ("IXI012-HH-1211_T1"), compared case-insensitively.
_CONTRASTS = {c.lower(): c for c in ("T1", "T1w", "T2", "T2w", "FLAIR", "PD", "PDw", "T2star", "SWI", "dwi", "adc",
                                     "trace", "bold", "asl", "cbf", "T1rho", "MPRAGE", "angio")}


def plain_contrast(stem: str) -> str:
    """The contrast a file name ends in (``sub-01_T1w`` -> "T1w", ``IXI012-HH-1211_T2`` -> "T2"); "" if none."""
    return _CONTRASTS.get(re.split(r"[_\-. ]", stem)[-1].lower(), "")


def _nifti_tree(root: Path) -> tuple[list[Path], list[DataError], list[DataError]]:
    """:func:`_nifti_entries` of ``root`` and every folder below it (symlinked folders not followed)."""
    files, problems, warnings = [], [], []
    for dirpath, _, _ in sorted(os.walk(root)):
        found, bad, odd = _nifti_entries(Path(dirpath))
        files += found
        problems += bad
        warnings += odd
    return files, problems, warnings


def _mask_kind(stem: str) -> str | None:
    """"lesion", "brain" or None (not a mask, or a mask of something else) for a BIDS-named file."""
    name = bids_name(stem)
    if name is None or name[1].lower() not in BIDS_MASK_SUFFIXES:
        return None
    entities = {k: v.lower() for k, v in name[0].items()}
    if "brain" in (entities.get("desc"), entities.get("label")):
        return "brain"
    if "lesion" in stem.lower() or name[1].lower() == "msk":
        return "lesion"
    return None


def _belongs_to(mask: Path, entities: dict[str, str]) -> bool:
    """Does a mask name a subset of a scan's entities (ignoring those that describe the derivative)?"""
    own = bids_name(_stem(mask))
    return own is not None and all(entities.get(k) == v for k, v in own[0].items() if k not in _DERIVATIVE_ENTITIES)


def _from_bids(folder: Path, root: Path | None, cfg: DataConfig) -> SiteListing:
    """A BIDS tree under ``root`` (``folder`` or ``folder/rawdata``), or with ``root`` None the
    BIDS-named files of ``folder`` itself."""
    problems, warnings, derivatives = [], [], []
    for d in dict.fromkeys([folder / "derivatives", *([root / "derivatives"] if root else [])]):
        found, bad, odd = _nifti_tree(d)
        derivatives += found
        problems += bad
        warnings += odd
    raw = []
    subject_folders = [] if root is None else sorted(p for p in root.glob("sub-*") if p.is_dir())
    for place in subject_folders or [folder]:
        found, bad, odd = _nifti_tree(place) if root is not None else _nifti_entries(place)
        raw += found
        problems += bad
        warnings += odd
    unreadable = {p.path for p in problems}
    masks = [p for p in [*derivatives, *raw, *sorted(unreadable)] if _mask_kind(_stem(p))]
    contrasts: dict[str, int] = {}
    scans = []
    wanted = cfg.bids_suffix.lower()
    for scan in raw:
        name = bids_name(_stem(scan))
        if name is None or scan in masks:
            continue
        entities, suffix = name
        contrasts[suffix] = contrasts.get(suffix, 0) + 1
        if suffix.lower() != wanted:
            continue
        mine = [p for p in masks if _belongs_to(p, entities)]
        lesion = [p for p in mine if _mask_kind(_stem(p)) == "lesion"]
        brain = [p for p in mine if _mask_kind(_stem(p)) == "brain"]
        for kind, found in (("lesion", lesion), ("brain", brain)):
            if len(found) > 1:
                problems.append(DataError(scan, f"{len(found)} {kind} masks: {', '.join(p.name for p in found)}; "
                                                "keep one"))
        if len(lesion) > 1 or len(brain) > 1 or _unreadable_mask(scan, mine, unreadable, problems):
            continue
        scan_id = _stem(scan)[: -len(suffix) - 1]
        scans.append(Scan(scan_id, scan, lesion[0] if lesion else None, brain[0] if brain else None,
                          subject=f"sub-{entities['sub']}", contrast=suffix))
    if contrasts and wanted not in {c.lower() for c in contrasts}:
        seen = ", ".join(f"{k} ({n})" for k, n in sorted(contrasts.items(), key=lambda kv: (-kv[1], kv[0].lower())))
        none = DataError(folder, f"no {cfg.bids_suffix} scans (data.bids_suffix); found: {seen} — set "
                                 "data.bids_suffix to one of them")
        if not problems:
            raise none
        problems.append(none)
    return SiteListing(folder, "bids", _bids_order(scans), problems, warnings)


def _bids_order(scans: list[Scan]) -> list[Scan]:
    """Scans without a session folder first, then by path (the order discovery always had)."""
    return sorted(scans, key=lambda s: (len(s.image.parts), str(s.image)))
