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


def _outline(masks: np.ndarray) -> np.ndarray:
    """The boundary pixels of each (…, H, W) bool mask: in the mask, with a 4-neighbour outside it.
    Beyond the image edge counts as the edge pixel's own value, so a mask that fills its slice, or
    reaches the edge, is not outlined along the edge (like a contour of the slice)."""
    p = np.pad(masks, [(0, 0)] * (masks.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    inner = p[..., :-2, 1:-1] & p[..., 2:, 1:-1] & p[..., 1:-1, :-2] & p[..., 1:-1, 2:]
    return masks & ~inner


def draw_site(slices: SiteSlices, path: str | Path, title: str, subjects: int = MAX_SUBJECTS,
              per_subject: int = SLICES_PER_SUBJECT) -> Path:
    """Write the site picture as PNG at ``path`` (folders created); returns ``path``.

    Each row is one scan (title: its id, and its subject where that differs); each panel one
    preprocessed slice (values [0, 1], grey, display orientation of
    :mod:`medgen.data.preprocess`: anterior up, patient left on image left) labelled with its axial
    index, brain outline yellow, lesion outline red.

    One RGB montage of all panels (each slice enlarged to about 190 px, nearest neighbour; the
    outlines are the masks' boundary pixels at that size), shown at one screen pixel per montage
    pixel by a single ``imshow``; the titles, labels and legend are text around it.
    """
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    def rgb8(colour: str) -> np.ndarray:
        return (np.array(to_rgb(colour)) * 255).round().astype(np.uint8)

    rows = picture_rows(slices, subjects, per_subject)
    if not rows:
        raise ValueError("no slice to draw")
    ncol = max(len(idx) for _, idx in rows)
    size = slices.images.shape[-1]
    up = max(1, round(190 / size))  # panel side `panel` px
    panel, gap, band = size * up, 8, 20  # band: the row title's strip above each row
    top, bottom, margin, dpi = 42, 30, 4, 100
    mont_w, mont_h = ncol * panel + (ncol - 1) * gap, len(rows) * (band + panel)
    fig_w, fig_h = max(mont_w + 2 * margin, 640), top + mont_h + bottom

    idx = np.concatenate([i for _, i in rows])
    big = lambda a: a[idx].repeat(up, axis=1).repeat(up, axis=2)
    grey = (np.clip(big(slices.images), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[_outline(big(slices.brain))] = rgb8(BRAIN_COLOUR)
    rgb[_outline(big(slices.lesion))] = rgb8(LESION_COLOUR)  # over the brain outline
    montage = np.full((mont_h, mont_w, 3), 255, np.uint8)  # the figure's white between panels

    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    x0 = (fig_w - mont_w) // 2
    text = lambda x, y, s, **kw: fig.text((x0 + x) / fig_w, 1 - (top + y) / fig_h, s, **kw)
    k = 0
    for r, (scan, mine) in enumerate(rows):
        subject = slices.subjects[mine[0]]
        y = r * (band + panel) + band
        text(0, y - 4, scan if subject == scan else f"{scan} (subject {subject})", fontsize=8)
        for c, i in enumerate(mine):
            x = c * (panel + gap)
            montage[y:y + panel, x:x + panel] = rgb[k]
            k += 1
            text(x + 3, y + panel - 3, f"z={int(slices.slice_index[i])}", color="white", fontsize=6)
    ax = fig.add_axes((x0 / fig_w, bottom / fig_h, mont_w / fig_w, mont_h / fig_h))
    ax.imshow(montage, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    n_scans = len(set(slices.scans.tolist()))
    fig.text(0.5, 1 - 4 / fig_h, f"{title}\n{len(rows)} of {n_scans} scan(s), {len(slices)} slices at "
             f"{size}x{size} px as trained on; anterior up, patient left on image left",
             fontsize=8.5, ha="center", va="top", multialignment="center")
    handles = [Line2D([], [], color=BRAIN_COLOUR, label="brain mask"),
               Line2D([], [], color=LESION_COLOUR, label="lesion mask")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7.5, frameon=False,
               bbox_to_anchor=(0.5, 0.0), borderaxespad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
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
