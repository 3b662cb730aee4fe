"""A picture of a site's data: what training will see. A few subjects (rows), several axial
slices across each one's brain (columns), the preprocessed slices with the brain-mask outline and
the lesion outline. Matplotlib's Agg canvas only (no pyplot, no global backend state).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medgen.data.dataset import SiteSlices

BRAIN_COLOUR = "#f5c518"  # yellow: brain-mask outline
LESION_COLOUR = "#ff2a2a"  # red: lesion outline
SITE_PICTURE = "overview.png"  # a site's picture in its state folder, which the site's report page shows
MAX_SUBJECTS = 4
SLICES_PER_SUBJECT = 5


def picture_rows(slices: SiteSlices, subjects: int = MAX_SUBJECTS, per_subject: int = SLICES_PER_SUBJECT
                 ) -> list[tuple[str, np.ndarray]]:
    """Which slices to draw: [(scan id, indices into ``slices``)], up to ``subjects`` scans (those
    with lesion slices first, then in id order), each up to ``per_subject`` slices spread evenly
    from the lowest to the highest kept axial slice; for a scan with lesion, its slice of largest
    lesion area takes the place of the nearest of these."""
    ids = list(dict.fromkeys(slices.scans.tolist()))
    lesioned = {s for s in ids if slices.lesion[slices.scans == s].any()}
    chosen = sorted(ids, key=lambda s: (s not in lesioned, s))[:subjects]
    rows = []
    for scan in chosen:
        mine = np.flatnonzero(slices.scans == scan)
        mine = mine[np.argsort(slices.slice_index[mine], kind="stable")]
        pick = np.unique(np.round(np.linspace(0, len(mine) - 1, min(per_subject, len(mine)))).astype(int))
        area = slices.lesion[mine].reshape(len(mine), -1).sum(1)
        if area.any() and int(area.argmax()) not in pick:
            pick[np.abs(pick - area.argmax()).argmin()] = area.argmax()
        rows.append((scan, mine[np.sort(pick)]))
    return rows


def draw_site(slices: SiteSlices, path: str | Path, title: str, subjects: int = MAX_SUBJECTS,
              per_subject: int = SLICES_PER_SUBJECT) -> Path:
    """Write the site picture as PNG at ``path`` (folders created); returns ``path``.

    Each row is one scan (title: its id, subject and axial index range); each panel one
    preprocessed slice (values [0, 1], grey, display orientation of
    :mod:`medgen.data.preprocess`: anterior up, patient left on image left) titled with its axial
    index, brain outline yellow, lesion outline red.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = picture_rows(slices, subjects, per_subject)
    if not rows:
        raise ValueError("no slice to draw")
    ncol = max(len(idx) for _, idx in rows)
    fig = Figure(figsize=(1.9 * ncol + 0.4, 2.2 * len(rows) + 0.9), layout="constrained")
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for row, (scan, idx) in zip(axes, rows):
        subject = slices.subjects[idx[0]]
        who = scan if subject == scan else f"{scan} (subject {subject})"
        row[0].set_title(who, fontsize=8, loc="left")
        for ax, i in zip(row, idx):
            ax.imshow(slices.images[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            for mask, colour in ((slices.brain[i], BRAIN_COLOUR), (slices.lesion[i], LESION_COLOUR)):
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.7)
            ax.text(0.02, 0.02, f"z={int(slices.slice_index[i])}", color="white", fontsize=6,
                    transform=ax.transAxes, va="bottom")
    handles = [Line2D([], [], color=BRAIN_COLOUR, label="brain mask"),
               Line2D([], [], color=LESION_COLOUR, label="lesion mask")]
    n_scans = len(set(slices.scans.tolist()))
    size = slices.images.shape[-1]
    fig.suptitle(f"{title}\n{len(rows)} of {n_scans} scan(s), {len(slices)} slices at {size}x{size} px as trained on; "
                 "anterior up, patient left on image left", fontsize=8.5)
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=7.5, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def default_picture_path(folder: str | Path) -> Path:
    """``DIR-overview.png`` beside the site folder ``DIR`` (``.`` and ``a/b/`` included)."""
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f"{folder.name}-overview.png")


def write_site_picture(slices: SiteSlices, state: str | Path, site: str) -> Path | None:
    """Draw a site's slices into its own state folder (``<state>/overview.png``: it stays at the
    site; a run's report shows it where it can read the folder). Returns the path, or None (and
    says why on stderr) when it cannot be drawn: a picture never stops a site."""
    import sys

    try:
        return draw_site(slices, Path(state) / SITE_PICTURE, f"site {site}")
    except (OSError, ValueError) as e:
        print(f"site {site}: no picture of its data ({e})", file=sys.stderr, flush=True)
        return None
