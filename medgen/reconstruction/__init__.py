"""Reconstruction with a trained generator as the prior (BRGM, Marinescu et al. 2021): super-resolution
and inpainting of slices by MAP estimation of the generator's latent (``medgen reconstruct``).

- :mod:`.operators` — the known forward operators f (area downsampling, masking), the ``--task``
  syntax, and the trivial baselines for each (bicubic / nearest, zero-filled / mean-fill / diffusion).
- :mod:`.features` — the feature network phi of the feature term (fixed random convolutions).
- :mod:`.solve` — the MAP solver over the latent of a family's ``generator_prior()``.
- :mod:`.metrics` — PSNR / SSIM / RMSE per slice.
- :mod:`.command` — the command: checkpoint + site folder in, metrics JSON, PNG grids, NIfTI out.
"""
