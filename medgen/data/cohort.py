"""Site folders made from other site folders: a cohort split into sites by subject, and a site
with synthetic lesions implanted (the real-anatomy lesion benchmark).

Both write a ``manifest.csv`` site folder; files that are not changed are symbolic links to the
originals (nothing is copied), so the source folders stay the single copy of the data. Neither
ever writes into an existing non-empty folder.
"""

from __future__ import annotations

import csv
import os
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medgen import strictjson
from medgen.config import DataConfig
from medgen.data import brain_mask
from medgen.data.errors import DataError
from medgen.data.implant import implant_lesions
from medgen.data.nifti import load_mask, load_volume
from medgen.data.preprocess import estimate_brain_mask
from medgen.data.sites import Scan, discover_site

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
COLUMNS = ("subject", "image", "mask", "brain_mask", "label")


def split_site(src: str | Path, out: str | Path, sites: list[str], cfg: DataConfig, seed: int = 0,
               brain_masks: str | Path | None = None) -> dict[str, Path]:
    """Split the subjects of site folder ``src`` at random (``seed``) into ``sites`` of equal size
    (+-1), one folder ``out/<site>`` each. ``brain_masks``: a folder of brain masks for scans that
    have none, paired by name (``<id>_T1.nii.gz`` takes the one file ``<id>_*.nii[.gz]`` there).
    Returns {site: folder}."""
    if len(set(sites)) != len(sites) or not sites:
        raise DataError(Path(out), f"site names must be distinct and at least one: {sites}")
    listing = _usable_listing(src, cfg)
    scans = [_with_brain_mask(s, Path(brain_masks)) if brain_masks and s.brain_mask is None else s
             for s in listing.scans]
    subjects = sorted({s.subject for s in scans})
    if len(subjects) < len(sites):
        raise DataError(Path(src), f"{len(subjects)} subjects cannot fill {len(sites)} sites")
    order = np.random.default_rng(seed).permutation(len(subjects))
    site_of = {subjects[j]: sites[k % len(sites)] for k, j in enumerate(order)}
    folders = {site: _empty_folder(Path(out) / site) for site in sites}
    for site, folder in folders.items():
        rows = [_linked_row(s, folder, s.label) for s in scans if site_of[s.subject] == site]
        _write_manifest(folder, rows)
    (Path(out) / "split.json").write_text(strictjson.dumps(
        {"source": str(Path(src).resolve()), "seed": seed, "sites": {
            site: sorted(subj for subj, where in site_of.items() if where == site) for site in sites}}, indent=1))
    return folders


def implant_site(src: str | Path, out: str | Path, cfg: DataConfig, seed: int = 0, fraction: float = 0.5,
                 kind: str = "mixed") -> Path:
    """A copy of site folder ``src`` in which ``fraction`` of the subjects (chosen with ``seed``)
    have synthetic lesions (:mod:`medgen.data.implant`) and a lesion mask; the others are links
    to the original scans. Every source scan must be healthy (no lesion mask, not labelled
    lesion): implanting into a scan with real lesions would score against a partial mask.
    Writes ``out/manifest.csv`` and ``out/implant.json`` (what was drawn per scan). Returns ``out``."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(Path(out), f"lesion fraction must be in (0, 1], got {fraction}")
    listing = _usable_listing(src, cfg)
    sick = [s.image for s in listing.scans if s.lesion_mask is not None or s.label == "lesion"]
    if sick:
        raise DataError(sick[0], f"has a lesion mask or label; implant needs healthy scans ({len(sick)} are not)")
    subjects = sorted({s.subject for s in listing.scans})
    chosen = np.random.default_rng(seed).permutation(len(subjects))[: max(1, round(fraction * len(subjects)))]
    lesion_subjects = {subjects[j] for j in chosen}
    folder = _empty_folder(Path(out))
    rows, drawn = [], {}
    for scan in listing.scans:
        if scan.subject not in lesion_subjects:
            rows.append(_linked_row(scan, folder, "healthy"))
            continue
        row = _linked_row(scan, folder, "lesion")
        image = load_volume(scan.image, cfg.volume_index, cfg.max_voxels)
        brain = _brain(scan, image, cfg)
        rng = np.random.default_rng([seed, zlib.crc32(scan.id.encode())])
        try:
            result = implant_lesions(image.data, brain, image.affine, rng, kind)
        except ValueError as e:
            raise DataError(scan.image, str(e)) from None
        name = _NIFTI.sub("", scan.image.name)
        (folder / row["image"]).unlink()
        row["image"] = _save(result.image, image.affine, folder, f"scans/{name}.nii.gz", np.float32)
        row["mask"] = _save(result.mask, image.affine, folder, f"masks/{name}_lesion.nii.gz", np.uint8)
        rows.append(row)
        drawn[scan.id] = result.info
    _write_manifest(folder, rows)
    (folder / "implant.json").write_text(strictjson.dumps(
        {"source": str(Path(src).resolve()), "seed": seed, "fraction": fraction, "kind": kind,
         "model": "medgen.data.implant", "scans": drawn}, indent=1))
    return folder


def _usable_listing(src, cfg: DataConfig):
    listing = discover_site(src, cfg)
    if listing.problems:
        raise DataError(listing.problems[0].path, f"{listing.problems[0].problem} "
                                                   f"({len(listing.problems)} problem(s) in {src}; run medgen data check)")
    return listing


def _with_brain_mask(scan: Scan, folder: Path) -> Scan:
    stem = _NIFTI.sub("", scan.image.name)
    prefix = stem.rsplit("_", 1)[0] + "_" if "_" in stem else stem + "_"
    found = sorted(p for p in folder.iterdir() if _NIFTI.search(p.name) and p.name.startswith(prefix))
    if len(found) != 1:
        raise DataError(scan.image, f"{len(found)} files named {prefix}*.nii[.gz] in {folder} "
                                    "(need exactly one brain mask per scan)")
    return Scan(scan.id, scan.image, scan.lesion_mask, found[0], scan.label, scan.subject)


def _brain(scan: Scan, image, cfg: DataConfig) -> np.ndarray:
    """The scan's brain mask on its own grid: the supplied one, else estimated as ``data.brain_mask``
    says (the model works in RAS+ voxel order: the scan is reoriented there and back, exactly)."""
    if scan.brain_mask is None:
        if brain_mask.resolve(cfg.brain_mask)[0] == brain_mask.THRESHOLD:
            return estimate_brain_mask(image.data, np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0)))
        ornt = nib.orientations.io_orientation(image.affine)
        ras = brain_mask.model_mask(nib.orientations.apply_orientation(image.data, ornt))
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
        return nib.orientations.apply_orientation(ras, back).astype(bool)
    mask = load_mask(scan.brain_mask, cfg.volume_index, cfg.max_voxels)
    if mask.data.shape != image.data.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise DataError(scan.brain_mask, f"brain mask grid differs from its scan {scan.image.name} "
                                         "(implant needs both on one grid)")
    return mask.data > 0.5


def _empty_folder(path: Path) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DataError(path, "exists and is not an empty folder; choose another --out")
    for sub in ("scans", "masks", "brainmasks"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def _link(target: Path | None, folder: Path, sub: str) -> str:
    """A link ``folder/sub/<name>`` to the real file behind ``target`` (named as the site names it);
    its path relative to ``folder``, or "" for no file."""
    if target is None:
        return ""
    link = folder / sub / Path(target).name
    if link.is_symlink():
        raise DataError(Path(target), f"two scans or masks share the file name {link.name}; rename one")
    os.symlink(Path(target).resolve(), link)
    return f"{sub}/{link.name}"


def _linked_row(scan: Scan, folder: Path, label: str | None) -> dict:
    return {"subject": scan.subject, "label": label or "", "image": _link(scan.image, folder, "scans"),
            "mask": _link(scan.lesion_mask, folder, "masks"), "brain_mask": _link(scan.brain_mask, folder, "brainmasks")}


def _save(data: np.ndarray, affine: np.ndarray, folder: Path, relative: str, dtype) -> str:
    """Write ``data`` as NIfTI at ``folder/relative``; returns ``relative``."""
    img = nib.Nifti1Image(np.asarray(data, dtype), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, folder / relative)
    return relative


def _write_manifest(folder: Path, rows: list[dict]) -> None:
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
