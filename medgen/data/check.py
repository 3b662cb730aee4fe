"""`medgen data check DIR`: is this site folder usable, and what is in it?"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medgen.cli.exitcodes import DONE, INPUT_ERROR, SOME_FILES_BAD
from medgen.config import DataConfig
from medgen.data.dataset import LESION, SiteSlices, load_site
from medgen.data.errors import DataError, SiteDataError
from medgen.data.nifti import describe
from medgen.data.sites import Scan, discover_site

OK, PROBLEMS, UNUSABLE = DONE, SOME_FILES_BAD, INPUT_ERROR


@dataclass
class CheckReport:
    folder: Path
    layout: str = "?"
    scans: int = 0
    voxel_sizes: Counter = field(default_factory=Counter)
    orientations: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    contrasts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    slices: SiteSlices | None = None
    problems: list[DataError] = field(default_factory=list)
    warnings: list[DataError] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: usable, no problem; 1: usable but some files are bad (training with
        ``data.on_bad_file: fail`` would stop); 3: nothing usable."""
        if self.slices is None or len(self.slices) == 0:
            return UNUSABLE
        return PROBLEMS if self.problems else OK

    def summary(self, cfg: DataConfig) -> str:
        lines = [f"site folder: {self.folder}  (layout: {self.layout})", f"scans: {self.scans}",
                 f"voxel sizes (mm): {counts_text(self.voxel_sizes)}", f"orientations: {counts_text(self.orientations)}",
                 f"data types: {counts_text(self.dtypes)}", f"contrasts: {counts_text(self.contrasts)}"]
        if self.slices is not None:
            s = self.slices
            n_lesion = int((s.labels == LESION).sum())
            lines += [
                f"usable scans: {len(set(s.scans.tolist()))} ({len(set(s.subjects.tolist()))} subjects), "
                f"lesion subjects: {len(s.lesion_subjects)}",
                f"usable slices: {len(s)} ({n_lesion} lesion, {len(s) - n_lesion} healthy) "
                f"at {cfg.image_size}x{cfg.image_size} px, {'x'.join(f'{v:g}' for v in cfg.spacing_mm)} mm",
            ]
        lines += [f"note: {n}" for n in (self.slices.notes if self.slices is not None else self.notes)]
        lines.append(f"skipped scans: {len(self.skipped)}")
        lines += [f"  - {p}" for p in self.skipped]
        lines.append(f"warnings: {len(self.warnings)}")
        lines += [f"  - {w}" for w in self.warnings]
        lines.append(f"problems: {len(self.problems)}")
        lines += [f"  - {p}" for p in self.problems]
        verdict = {OK: "OK: usable", PROBLEMS: "USABLE WITH PROBLEMS: fix or set data.on_bad_file=skip",
                   UNUSABLE: "NOT USABLE: no usable slice"}[self.exit_code]
        lines.append(verdict)
        return "\n".join(lines)


def scan_headers(scans) -> tuple[Counter, Counter, Counter]:
    """Counts of voxel sizes (mm, file axis order, e.g. "1x1x3"), orientations (e.g. "LPS",
    "RAS oblique") and on-disk data types over the scans' images, from headers only. Unreadable
    files are left out (loading reports them)."""
    voxel_sizes, orientations, dtypes = Counter(), Counter(), Counter()
    for scan in scans:
        try:
            info = describe(scan.image)
        except DataError:
            continue
        voxel_sizes["x".join(f"{v:.3g}" for v in info["voxel_size"])] += 1
        orientations[info["orientation"] + (" oblique" if info["oblique"] else "")] += 1
        dtypes[info["dtype"]] += 1
    return voxel_sizes, orientations, dtypes


def scan_contrast(scan: Scan) -> str:
    """What a scan is, as its name and JSON sidecar say: its BIDS suffix or contrast word
    (``dwi``, ``T1``) and/or the sidecar's ``SeriesDescription`` ("T1w (MPRAGE sag)"); "unknown"."""
    sidecar = scan.image.with_name(scan.image.name.split(".nii")[0] + ".json")
    description = ""
    if sidecar.is_file():
        try:
            description = str(json.loads(sidecar.read_text()).get("SeriesDescription") or "").strip()
        except (OSError, ValueError, AttributeError):
            description = ""
    if scan.contrast and description:
        return f"{scan.contrast} ({description})"
    return scan.contrast or description or "unknown"


def mixed_contrasts(scans: list[Scan], folder: Path) -> tuple[Counter, list[DataError]]:
    """(count of each contrast over the scans, a warning per scan not of the most common contrast
    when there are several). Scans of unknown contrast are not counted as a contrast of their own."""
    of = {scan.image: scan_contrast(scan) for scan in scans}
    counts = Counter(of.values())
    known = [c for c, _ in counts.most_common() if c != "unknown"]
    if len(known) < 2:
        return counts, []
    text = counts_text(Counter({c: counts[c] for c in known}))
    return counts, [DataError(path, f"contrast {c!r}, but the site mixes contrasts ({text}); one model learns one "
                                    "contrast: keep one per site (BIDS: data.bids_suffix)")
                    for path, c in of.items() if c in known[1:]]


def counts_text(counts: Counter) -> str:
    """"1x1x3 (5), 1x1x1 (2)": most common first; "-" when empty."""
    return ", ".join(f"{k} ({n})" for k, n in counts.most_common()) or "-"


def check_site(folder: str | Path, cfg: DataConfig) -> CheckReport:
    """Validate every file of a site folder; collect all problems rather than stop at the first.
    Every scan that training with ``data.on_bad_file: skip`` would leave out is listed in ``skipped``."""
    report = CheckReport(Path(folder))
    try:
        listing = discover_site(folder, cfg)
    except DataError as e:
        report.problems.append(e)
        return report
    report.layout = listing.layout
    report.scans = len(listing.scans)
    report.voxel_sizes, report.orientations, report.dtypes = scan_headers(listing.scans)
    report.contrasts, mixed = mixed_contrasts(listing.scans, Path(folder))
    report.warnings = list(listing.warnings)
    report.notes = list(listing.notes)
    try:
        report.slices = load_site(folder, cfg.model_copy(update={"on_bad_file": "skip"}))
        report.problems = report.slices.problems
        report.warnings = report.slices.warnings
    except SiteDataError as e:
        report.problems = e.problems
    report.warnings = report.warnings + mixed
    used = set(report.slices.scans.tolist()) if report.slices is not None else set()
    report.skipped = [scan.image for scan in listing.scans if scan.id not in used]
    return report
