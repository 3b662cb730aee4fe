"""Bias-field (intensity non-uniformity) correction with SimpleITK's N4 (Tustison et al. 2010).

N4 is fitted inside the brain mask on a copy shrunk by ``shrink`` per axis (the usual speed-up);
its log bias field (a B-spline) is then evaluated on the full-resolution grid and divided out.
"""

from __future__ import annotations

import numpy as np

FIT_MM = 6.0  # N4 is fitted on a grid of about this spacing (shrink 3 on the default 2 mm grid)
ITERATIONS = (50, 50, 30)  # per fitting level (3 levels: B-spline mesh doubles each level)


def shrink_factor(spacing_mm, fit_mm: float = FIT_MM) -> int:
    """Integer shrink per axis that brings the finest of ``spacing_mm`` to about ``fit_mm``."""
    return max(1, int(round(fit_mm / float(min(spacing_mm)))))


def n4_correct(data: np.ndarray, mask: np.ndarray, spacing_mm, shrink: int | None = None,
               iterations=ITERATIONS) -> np.ndarray:
    """N4-corrected copy of a (X, Y, Z) image (voxel size ``spacing_mm``, 3 floats) fitted inside
    bool ``mask`` (X, Y, Z): float32 (X, Y, Z), ``data / bias`` with the bias field rescaled to mean 1
    inside the mask (so intensities keep their scale). Voxels <= 0 are left out of the fit.
    ``shrink`` None: :func:`shrink_factor`.
    Raises ValueError when fewer than 100 mask voxels are positive."""
    import SimpleITK as sitk

    fit = mask & (data > 0)
    if fit.sum() < 100:
        raise ValueError(f"bias correction: only {int(fit.sum())} positive voxels inside the brain mask")
    # SimpleITK arrays are (z, y, x): transpose so that ITK's x is our first axis.
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing_mm])
    fit_mask = sitk.GetImageFromArray(np.ascontiguousarray(fit.transpose(2, 1, 0), dtype=np.uint8))
    fit_mask.CopyInformation(image)
    shrink = shrink_factor(spacing_mm) if shrink is None else shrink
    small, small_mask = image, fit_mask
    if shrink > 1:
        small = sitk.Shrink(image, [shrink] * 3)
        small_mask = sitk.Shrink(fit_mask, [shrink] * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).transpose(2, 1, 0)
    log_field = log_field - log_field[fit].mean()
    return (data / np.exp(log_field)).astype(np.float32)
