"""One typed configuration for every medgen command.

A config is YAML (``--config FILE``) plus ``--set section.key=value`` overrides, validated
against the schema below. Every error names the full key path and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    root: Path | None = Field(
        None, description="folder with one sub-folder per site; null = the built-in phantom cohort"
    )
    image_size: int = Field(64, ge=16, le=512, multiple_of=8, description="slice side in pixels")
    spacing_mm: tuple[float, float, float] = Field(
        (2.0, 2.0, 2.0), description="common voxel spacing (x, y, z) in mm after resampling"
    )
    volume_index: int | None = Field(None, ge=0, description="volume to take from 4D files")
    percentiles: tuple[float, float] = Field(
        (1.0, 99.0), description="brain intensity percentiles mapped to 0 and 1"
    )
    min_brain_fraction: float = Field(
        0.25, gt=0.0, le=1.0,
        description="keep axial slices whose brain area is at least this fraction of the largest",
    )
    min_lesion_pixels: int = Field(
        4, ge=1, description="lesion pixels (at image_size) for a slice to be labelled lesion"
    )
    lesion_mask_suffixes: list[str] = Field(
        ["_mask", "_seg", "_lesion"], min_length=1,
        description="file-name suffixes of lesion masks in plain-file site folders",
    )
    brain_mask_suffix: str = Field("_brainmask", min_length=1)
    bids_suffix: str = Field("T1w", min_length=1, description="BIDS contrast to use (T1w, FLAIR, T2w)")
    on_bad_file: Literal["fail", "skip"] = "fail"
    brain_mask: Literal["auto", "model", "threshold"] = Field(
        "auto",
        description="brain mask of a scan without a supplied one: model = deepbet (a trained network shipped "
                    "in its wheel, ~2.5 s per volume on 2 CPU cores), threshold = Otsu + morphology (no model; keeps "
                    "skull base and neck on heads with skull), auto = model when deepbet is installed, else "
                    "threshold. A supplied brain mask always wins",
    )
    bias_correction: Literal["n4", "none"] = Field(
        "none", description="bias-field correction before intensity normalisation: n4 = SimpleITK's N4 inside "
                            "the brain mask (~1 s per volume on 2 CPU cores), none = off (the default: on the "
                            "real-anatomy benchmark N4 halved lesion Dice, benchmarks/README.md)",
    )
    max_voxels: int = Field(
        512**3, ge=1,
        description="refuse a file whose header implies more voxels than this (all volumes of a 4-D file), "
                    "before any voxel is read or decompressed; 512^3 = 1.3e8 voxels, 537 MB as float32",
    )
    lesion_labels: list[int] | None = Field(
        None, min_length=1,
        description="label values of a multi-label lesion mask that are lesion (the other labels are not); "
                    "null = lesion masks must be binary (0 and one other value, or probabilities >= 0.5)",
    )
    allow_external_paths: bool = Field(
        False, description="manifest paths may point outside the site folder (after resolving symlinks)"
    )
    cache_dir: Path | None = Field(
        None, description="slice cache; null = $MEDGEN_CACHE_DIR or ~/.cache/medgen"
    )
    workers: int | None = Field(
        None, ge=1, le=256,
        description="threads that preprocess a site's new scans in parallel; null = one per CPU the site's "
                    "process may use, and never more than that whatever is asked; 1 = one after the other",
    )

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 or s > 10 for s in v):
            raise ValueError("each spacing must be in (0, 10] mm")
        return v

    @field_validator("lesion_labels")
    @classmethod
    def _lesion_labels(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (0 in v or len(set(v)) != len(v)):
            raise ValueError("lesion labels must be distinct and non-zero (0 is background)")
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError("need 0 <= low < high <= 100")
        return v


class PhantomConfig(_Section):
    subjects_per_site: int = Field(8, ge=1, le=500)
    lesion_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of lesion subjects")


Family = Literal["vae", "cevae", "vqvae", "gan", "ddpm", "flow"]
MASK_CONDITIONED_FAMILIES = ("ddpm", "gan")  # model.mask_conditioning (medgen/models/mask_conditioning.py)


class ModelConfig(_Section):
    family: Family = "vae"
    width: int = Field(16, ge=4, le=512, description="channels of the first conv layer (16: CPU; 64: GPU)")
    latent_dim: int = Field(64, ge=2, le=4096, description="VAE / GAN latent size")
    recon_loss: Literal["mse", "l1"] = "mse"
    beta: float = Field(
        0.1, ge=0.0, description="VAE: weight of the KL term (0.1: sharper reconstructions, better anomaly maps; "
                                 "benchmarks/README.md)"
    )
    kl_warmup_steps: int = Field(0, ge=0, description="VAE: KL weight ramps 0 -> beta over these local steps")
    ce_weight: float = Field(1.0, ge=0.0, description="ceVAE: weight of the context-encoding loss (reconstructing "
                                                      "the image from a copy with a random patch replaced by noise)")
    codebook_size: int = Field(64, ge=2, le=65_536, description="VQ-VAE: number of codes")
    code_dim: int = Field(16, ge=2, le=1024, description="VQ-VAE: size of a code vector")
    commitment: float = Field(0.25, ge=0.0, description="VQ-VAE: weight of the commitment loss ||z - sg[e]||^2")
    restart_every: int = Field(
        50, ge=0, description="VQ-VAE without DP-SGD: every this many local steps, codes unused on the batch are "
                              "re-initialised from used codes + noise (0: never; never under DP-SGD)")
    restore_threshold: float = Field(
        0.01, gt=0.0, lt=1.0, description="VQ-VAE anomaly maps (score=restored): codes less likely than this under "
                                          "the prior are replaced by the prior's most likely code")
    flow_levels: int = Field(3, ge=1, le=6, description="flow: scales (squeeze, steps, split); data.image_size must "
                                                         "be divisible by 2**flow_levels")
    flow_steps: int = Field(4, ge=1, le=64, description="flow: steps (channel affine, 1x1 conv, coupling) per scale")
    flow_temperature: float = Field(0.7, gt=0.0, le=2.0, description="flow: std of the latents drawn for samples "
                                                                     "(1: the model's own; lower: smoother)")
    norm_groups: int = Field(8, ge=1, description="GroupNorm groups (no BatchNorm: DP-SGD compatible)")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="GAN generator / DDPM weights EMA used for sampling")
    gan_loss: Literal["hinge", "nonsaturating"] = "hinge"
    inversion_steps: int = Field(100, ge=1, le=10_000, description="GAN anomaly maps: latent optimisation steps per batch")
    timesteps: int = Field(1000, ge=10, le=10_000, description="DDPM: diffusion steps")
    space: Literal["latent", "pixel"] = Field(
        "latent", description="DDPM: diffuse the 4 x S/4 x S/4 latents of an autoencoder trained with it ('latent', "
                              "Rombach et al. 2022; cleaner samples in a CPU budget) or the images ('pixel')")
    preconditioning: Literal["edm", "none"] = Field(
        "edm", description="DDPM: 'edm' scales the U-Net's input and output per noise level and weights the "
                           "eps-loss so every level counts alike (Karras et al. 2022); 'none': plain eps-MSE (Ho et al.)")
    sigma_data: float = Field(0.5, gt=0.0, description="DDPM (edm preconditioning): std of the images scaled to [-1, 1]")
    schedule: Literal["cosine", "linear"] = "cosine"
    attention: bool = Field(True, description="DDPM: self-attention at the lowest resolutions")
    cond_drop: float = Field(0.1, ge=0.0, lt=1.0, description="DDPM: label dropout for classifier-free guidance; "
                                                             "mask-conditioned DDPM / GAN: also the share of masks "
                                                             "dropped alone (mask unknown: label-only sampling)")
    guidance_scale: float = Field(1.0, ge=0.0, description="DDPM: classifier-free guidance (1 = none)")
    sampler: Literal["ddim", "ddpm"] = "ddim"
    ddim_steps: int = Field(50, ge=1, le=10_000, description="DDPM: DDIM sampling steps")
    ddim_eta: float = Field(1.0, ge=0.0, le=1.0, description="DDPM: DDIM sampling noise (1: ancestral on the strided "
                                                          "chain, cleaner from a briefly trained model; 0: deterministic)")
    anomaly_t: int | None = Field(
        None, ge=1, description="DDPM anomaly maps: noise to step t, then denoise; null = 800 of 1000 steps, "
                                "scaled to model.timesteps")
    anomaly_noise: Literal["gaussian", "simplex"] = "gaussian"
    anomaly_steps: int = Field(
        1, ge=1, description="DDPM anomaly maps: DDIM steps from anomaly_t back to t = 0 (1: the network's "
                             "one-step estimate of the healthy image; AnoDDPM denoises step by step)")
    anomaly_draws: int = Field(8, ge=1, le=256, description="DDPM anomaly maps: noise draws whose squared errors are averaged")
    mask_conditioning: bool = Field(
        False, description="DDPM: also condition on the slice's lesion mask (extra U-Net input channels: the mask, "
                           "area-averaged to the latent grid in latent space, and a mask-known flag); GAN: SPADE "
                           "generator conditioned on the mask, discriminator sees (image, mask); so `medgen "
                           "synthesize` can place lesions where a mask says (medgen/models/mask_conditioning.py)")
    gan_fake_masks: Literal["auto", "real", "synthetic"] = Field(
        "auto", description="mask-conditioned GAN: the masks its generator is trained on. 'real': the batch's own "
                            "lesion masks; 'synthetic': data-independent blobs placed in the EMA generator's own "
                            "healthy brain (never a site's mask); 'auto': real, synthetic under privacy.enabled "
                            "('real' is refused there: the generator is not DP-trained; medgen/models/gan.py)")

    @model_validator(mode="after")
    def _mask_family(self) -> ModelConfig:
        if self.mask_conditioning and self.family not in MASK_CONDITIONED_FAMILIES:
            raise ValueError(f"model.mask_conditioning=true is implemented for model.family="
                             f"{' / '.join(MASK_CONDITIONED_FAMILIES)} only (not {self.family})")
        return self


# the model keys that change how trained weights sample or score, not the weights themselves:
# the only ones `medgen evaluate` lets a checkpoint's config change
INFERENCE_KEYS = frozenset(f"model.{k}" for k in ("guidance_scale", "sampler", "ddim_steps", "ddim_eta",
                                                  "anomaly_t", "anomaly_noise", "anomaly_steps", "anomaly_draws",
                                                  "inversion_steps", "restore_threshold", "flow_temperature"))


class TrainConfig(_Section):
    local_steps: int | None = Field(100, ge=1, le=1_000_000, description="optimiser steps per site per round")
    local_epochs: float | None = Field(None, gt=0, le=10_000, description="instead of local_steps: passes over the "
                                                                            "site's data")
    batch_size: int = Field(32, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0.0)
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of each training site's subjects kept for validation"
    )
    device: str = Field("cpu", description="torch device (cpu, cuda, cuda:1, ...)")
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none", description="mixed precision of the training steps: bf16 (CUDA, or CPU autocast) or fp16 (CUDA only, "
                            "with a loss scaler); none = float32. Not with privacy.enabled (medgen/models/precision.py)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", v):
            raise ValueError("a torch device: cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs (the other null)")
        kind = self.device.partition(":")[0]
        if self.amp != "none" and kind == "mps" or self.amp == "fp16" and kind == "cpu":
            raise ValueError(f"train.amp={self.amp} is not supported on train.device={self.device} (bf16 runs on cuda "
                             f"and cpu, fp16 on cuda only; none everywhere)")
        return self


class FederationConfig(_Section):
    rounds: int = Field(5, ge=1, le=10_000)
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", "fedmedian", "fedtrimmedavg", "krum",
                      "multikrum", "bulyan"] = "fedavg"
    min_sites: int | None = Field(
        None, ge=1, description="training sites that must answer for a round to count; null = all (that were asked)"
    )
    fraction_train: float = Field(
        1.0, gt=0.0, le=1.0,
        description="share of the training sites asked to train each round: ceil(fraction x n) drawn at random; "
                    "with privacy.central each site with this probability (Poisson sampling, the accountant's rate)")
    round_timeout_s: float = Field(600.0, gt=0.0, description="how long to wait for the sites each round")
    query_timeout_s: float | None = Field(
        None, gt=0.0, description="how long to wait for a site's first answer, when it loads and preprocesses its "
                                  "data (and a simulated site's Ray actor starts); null = round_timeout_s")
    eval_every: int = Field(1, ge=1, description="evaluate on every site every k rounds (and after the last)")
    proximal_mu: float = Field(0.01, ge=0.0, description="fedprox: weight of the proximal term")
    server_lr: float = Field(0.01, gt=0.0, description="fedadam / fedyogi: server learning rate")
    server_betas: tuple[float, float] = Field((0.9, 0.99), description="fedadam / fedyogi: moment decays")
    server_tau: float = Field(1e-3, gt=0.0, description="fedadam / fedyogi: adaptivity (epsilon)")
    samples_per_class: int = Field(8, ge=0, le=256, description="sample images written per class at evaluation")
    max_update_ratio: float | None = Field(
        10.0, gt=1.0, description="an update farther from the global model than this times the round's (lower) "
                                  "median distance is rejected or clipped (on_large_update); null = no bound (the "
                                  "default with secure_aggregation=secaggplus)")
    on_large_update: Literal["reject", "clip"] = Field(
        "reject", description="reject: leave the update out of the round; clip: scale it down to the bound")
    num_malicious: int = Field(1, ge=0, description="krum / multikrum / bulyan: the number f of bad sites tolerated")
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5, description="fedtrimmedavg: share cut at each end per coordinate")
    multikrum_keep: int | None = Field(None, ge=1, description="multikrum: updates averaged; null = n - num_malicious")
    secure_aggregation: Literal["off", "secaggplus"] = Field(
        "off", description="secaggplus: the server learns only the sum of the sites' (quantised, weighted) updates "
                           "(SecAgg+, README \"Secure aggregation\"); off: it sees each site's weights")
    secagg_threshold: int | None = Field(
        None, ge=2, description="secaggplus: sites that must stay to the end of a round for the sum to be unmasked "
                                "(and the most that can drop is n - this); must be a majority of the round's n "
                                "sites; null = n // 2 + 1")
    secagg_clip: float = Field(
        1.0, gt=0.0, description="secaggplus: each coordinate of a site's update (its weights minus the global "
                                 "model's) is clipped to [-clip, clip] before quantisation")
    secagg_bits: int = Field(
        24, ge=8, le=32, description="secaggplus: quantisation levels 2^bits over [-clip, clip]; the mean update is "
                                     "within clip / (2^bits - 1) of the exact one per coordinate")

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @model_validator(mode="before")
    @classmethod
    def _no_update_bound_over_sums(cls, data):
        # the default bound compares one site's update with the others', which a server that sees only
        # their sum cannot do: a secure study goes without it unless max_update_ratio is set by name
        if isinstance(data, dict) and data.get("secure_aggregation") == "secaggplus":
            data = {"max_update_ratio": None, **data}
        return data


class EvaluationConfig(_Section):
    every_rounds: int = Field(
        0, ge=0, description="full evaluation (distances, anomaly detection) every k rounds; 0 = after the last only"
    )
    max_samples: int = Field(64, ge=4, le=50_000, description="generated images per class for the distances")
    max_anomaly_slices: int = Field(200, ge=4, le=100_000, description="slices per site scored for anomaly detection")
    healthy_quantile: float = Field(
        0.99, gt=0.5, lt=1.0, description="Dice threshold: this quantile of healthy validation pixels' scores "
                                          "(0.99: about 1% of healthy brain pixels flagged)"
    )
    calibration: Literal["auto", "healthy-subjects", "training-sites", "outside-lesions"] = Field(
        "auto", description="which healthy slices fix the Dice threshold at a site with lesions: healthy-subjects "
                            "(half of the site's own; not scored), training-sites (their healthy validation "
                            "slices' quantile), auto (the first when the site has 2+ healthy subjects, else the "
                            "second), outside-lesions (the site's slices outside the masks: looks at the masks)"
    )
    max_intensity_shift: float = Field(
        0.15, gt=0.0, le=1.0, description="warn on a site page when the site's brain-intensity histogram is further "
                                          "than this (Jensen-Shannon divergence, bits) from the training sites'"
    )
    median_filter_px: int = Field(
        5, ge=0, le=15, description="anomaly maps: per-slice median filter of this size before scoring (0 = none)"
    )
    erode_brain_px: int = Field(
        0, ge=0, le=10, description="anomaly maps: scores within this many pixels of the brain-mask edge set to 0"
    )
    inception_weights: Path | None = Field(
        None, description="pytorch-fid InceptionV3 weights; null = the torch hub cache; FID is skipped without them"
    )
    share_images: bool = Field(
        False, description="sites may send a few anomaly-map overlays and sample slices for the report"
    )
    server_data: Path | None = Field(
        None, description="a site folder the server itself holds: the global model is also evaluated on it, "
                          "centrally, as site \"server\"; null = none"
    )
    memorisation_ratio: float = Field(
        0.5, gt=0.0, le=1.0, description="memorisation audit: a sample is flagged when its nearest training slice "
                                         "is closer than this times its nearest held-out slice"
    )
    utility: bool = Field(
        False, description="final evaluation: each site with lesion and healthy subjects also trains a small slice "
                           "classifier on its real slices, on as many samples and on both, and sends the AUROCs on "
                           "its other subjects (numbers only; README \"Synthetic-data utility\")")
    membership_inference: bool = Field(
        True, description="memorisation audit: also the loss-based membership-inference AUC (train vs held-out)"
    )

    @field_validator("median_filter_px")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v > 1 and v % 2 == 0:
            raise ValueError("must be 0, 1 or odd (a median filter centred on its pixel)")
        return v


class SimulationConfig(_Section):
    ray_address: str | None = Field(None, description="existing Ray cluster (e.g. ray://host:10001); null = local")
    client_cpus: float | None = Field(
        None, gt=0.0, description="CPUs reserved per simulated site (its torch threads too); null = at least 2, "
                                  "CPUs / training sites when more, never more than the machine has")
    client_gpus: float = Field(0.0, ge=0.0, description="GPUs (fraction) reserved per simulated site")
    hung_grace_s: float = Field(
        20.0, gt=0.0, description="when the ServerApp ended without writing an outcome (it crashed), how "
                                  "long Flower's engine may take to stop before the ClientApp actors that "
                                  "keep it waiting (a hung site) are killed; with an outcome written, "
                                  "`medgen simulate` stops the engine at once")


class SitePolicy(_Section):
    """What a site agrees to, kept at the site (``medgen-client join --policy FILE``) and checked
    against every config the server sends before any data is read. The defaults are the safe ones:
    a site that writes no policy gets them."""

    require_dp: bool = Field(True, description="refuse to train without DP-SGD (privacy.enabled)")
    require_secure_aggregation: bool = Field(
        False, description="refuse to send a clear update: serve only studies with federation.secure_aggregation "
                           "on (secaggplus)")
    min_secagg_sites: int = Field(
        3, ge=2, description="secaggplus: refuse to take part in, or to open shares for, a round whose secure sum "
                             "would hold fewer sites' updates than this (in a sum of two, each site learns the "
                             "other's update; the study's federation.secagg_threshold cannot lower it)")
    max_epsilon: float | None = Field(
        10.0, gt=0.0, description="the site's hard privacy budget over its whole lifetime (every round of every "
                                  "study in its ledger), accounted at the site's own delta; null = none")
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="the delta at which the site accounts its budget; null = 1/(10 n) for its "
                                          "n training subjects (the server's privacy.delta never lowers epsilon here)")
    min_noise_multiplier: float = Field(0.5, ge=0.0, description="refuse DP-SGD with less noise than this")
    min_central_noise_multiplier: float = Field(
        0.0, ge=0.0, description="privacy.central with secaggplus (the site adds its share of the noise itself): "
                                 "refuse a study whose central noise multiplier (fixed, or solved from "
                                 "privacy.central.target_epsilon) is below this; 0 = no minimum")
    max_grad_norm: float = Field(10.0, gt=0.0, description="refuse a per-sample clipping norm above this")
    privacy_unit: Literal["slice", "subject"] = Field(
        "subject", description="the weakest protected unit accepted: subject refuses privacy.unit=slice")
    share_images: bool = Field(
        False, description="may anomaly-map overlays and the memorisation audit's image pairs leave the site "
                           "(false: never, whatever the study asks)")
    allow_mask_conditioning: bool = Field(
        False, description="may the site's lesion masks be fed into the model (model.mask_conditioning: extra "
                           "input channels, in training and evaluation; false: refuse such a study)")
    allow_families: list[Family] = Field(
        ["vae", "cevae", "vqvae", "gan", "ddpm", "flow"], description="model families the site trains")
    max_local_steps: int = Field(10_000, ge=1, description="refuse more optimiser steps per round than this")
    allowed_studies: list[str] = Field(
        [], description="study names or config fingerprints the site agreed to; [] = every study (in a deployment: "
                        "every study signed by the coordinator's study key)")
    allow_external_paths: bool = Field(
        False, description="may the site's manifest name files outside its data folder (the study's "
                           "data.allow_external_paths is ignored)")
    max_voxels: int = Field(
        512 ** 3, ge=1, description="the largest scan the site reads (the study's data.max_voxels can only lower it)")
    cache_dir: Path | None = Field(
        None, description="the site's slice cache; null = $MEDGEN_CACHE_DIR, else <state-dir>/cache in a deployment")
    inception_weights: Path | None = Field(
        None, description="pytorch-fid InceptionV3 weights at the site; null = the torch hub cache")


class SitesConfig(_Section):
    train: list[str] = Field(["A", "B", "C"], min_length=1)
    heldout: list[str] = Field(["D"])
    policies: dict[str, SitePolicy] = Field(
        {}, description="simulation only: each simulated site's policy (as its policy file would say); a site "
                        "without one checks nothing. Deployed sites ignore this and read their own --policy file")

    @field_validator("train", "heldout")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("site names must be unique")
        bad = [n for n in v if not n or "/" in n or n.startswith(".") or n in ("global", "server")]
        if bad:
            raise ValueError(f"{bad} are not usable as site (folder) names (\"global\" and \"server\" are reserved)")
        return v

    @model_validator(mode="after")
    def _disjoint(self) -> SitesConfig:
        both = set(self.train) & set(self.heldout)
        if both:
            raise ValueError(f"heldout: sites {sorted(both)} are also in sites.train; held-out sites never train")
        unknown = set(self.policies) - set(self.train) - set(self.heldout)
        if unknown:
            raise ValueError(f"policies: sites {sorted(unknown)} are in neither sites.train nor sites.heldout")
        return self

    @property
    def all(self) -> list[str]:
        return self.train + self.heldout


class CentralDPConfig(_Section):
    """Central DP with Flower's semantics: each site's update clipped, Gaussian noise on the mean; a
    site-level guarantee (see README, "Central DP"). At the server, or under secaggplus at the sites
    (each clips its own update and adds noise z C / sqrt(t); README, "Central DP under secure
    aggregation")."""

    enabled: bool = Field(False, description="clip every site's update and noise their mean: at the server, or "
                                             "with federation.secure_aggregation=secaggplus at the sites")
    noise_multiplier: float | None = Field(
        None, gt=0.0, description="noise std / clipping norm (per site); null = solved from target_epsilon"
    )
    target_epsilon: float = Field(8.0, gt=0.0, description="site-level epsilon the noise is solved for, over federation.rounds")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="site-level delta")
    clipping_norm: float = Field(1.0, gt=0.0, description="L2 bound of each site's update (initial value when adaptive)")
    adaptive: bool = Field(False, description="adapt the clipping norm to a quantile of the update norms (Andrew et al. 2021)")
    target_clipped_quantile: float = Field(
        0.5, ge=0.0, le=1.0, description="adaptive: the clipping norm tracks this quantile of the sites' update "
                                         "norms (Andrew et al.'s gamma: this share of updates left unclipped)"
    )
    clip_norm_lr: float = Field(0.2, gt=0.0, description="adaptive: geometric learning rate of the clipping norm")
    clipped_count_stddev: float | None = Field(
        None, ge=0.0, description="adaptive: noise on the clipped count; null = training sites / 20 (Flower's default)"
    )


class PrivacyConfig(_Section):
    enabled: bool = Field(False, description="DP-SGD (Opacus) at every training site")
    target_epsilon: float = Field(8.0, gt=0.0, description="epsilon the noise is solved for, over the planned rounds")
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="null = 1/(10 n) for the site's n training subjects (below 1/n)"
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-sample clipping norm")
    noise_multiplier: float | None = Field(
        None, gt=0.0, description="fixed noise multiplier; null = solved from target_epsilon"
    )
    unit: Literal["slice", "subject"] = Field(
        "subject", description="what the guarantee protects: one slice, or one subject (all its slices)"
    )
    max_epsilon: float | dict[str, float] | None = Field(
        None, description="the site's own hard budget over everything it ever trained; a number, or "
                          "{site: number} for per-site budgets in a simulation; null = none"
    )

    @field_validator("max_epsilon")
    @classmethod
    def _budget(cls, v):
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(x <= 0 for x in values):
            raise ValueError("budgets must be > 0")
        return v

    central: CentralDPConfig = CentralDPConfig()

    def budget(self, site: str) -> float | None:
        return self.max_epsilon.get(site) if isinstance(self.max_epsilon, dict) else self.max_epsilon


class TrackingConfig(_Section):
    """Copies of the metrics, sample grids and final metrics for TensorBoard / MLflow, written by the
    server (medgen/server/tracking.py; needs ``pip install 'medgen[tracking]'``). metrics.jsonl stays
    the record."""

    tensorboard: bool = Field(False, description="TensorBoard event files in <run>/tensorboard")
    mlflow: str | None = Field(
        None, description="an MLflow tracking server (http(s)://...), a sqlite:/// database, or a directory "
                          "(relative: to the run directory) that gets DIR/mlflow.db and DIR/artifacts; null = off")

    @field_validator("mlflow")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty; null turns MLflow off")
        found = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", v or "")
        scheme = found.group(1).lower() if found else None
        if scheme == "file":
            raise ValueError("MLflow's file store is deprecated (MLflow 3): give a directory (it becomes a sqlite "
                             "store DIR/mlflow.db), a sqlite:/// URI or an http(s) server")
        if scheme not in (None, "http", "https", "sqlite"):
            raise ValueError(f"{scheme}: URIs may be http, https or sqlite; or give a directory")
        if scheme and urlsplit(v).username:
            raise ValueError("the config goes to every site: give the server's login in MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), not in the URI")
        return v


class Config(_Section):
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    phantom: PhantomConfig = PhantomConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    simulation: SimulationConfig = SimulationConfig()
    sites: SitesConfig = SitesConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _min_sites(self) -> Config:
        if self.federation.min_sites is not None and self.federation.min_sites > len(self.sites.train):
            raise ValueError(f"federation.min_sites={self.federation.min_sites} is more than the "
                             f"{len(self.sites.train)} training sites")
        fed = self.federation
        if fed.strategy == "bulyan" and len(self.sites.train) < 4 * fed.num_malicious + 3:
            raise ValueError(f"federation.strategy=bulyan needs at least 4 x federation.num_malicious + 3 = "
                             f"{4 * fed.num_malicious + 3} training sites ({len(self.sites.train)} in sites.train)")
        if fed.strategy == "multikrum" and (fed.multikrum_keep or 1) > len(self.sites.train):
            raise ValueError(f"federation.multikrum_keep={fed.multikrum_keep} is more than the "
                             f"{len(self.sites.train)} training sites")
        if fed.fraction_train < 1.0 and fed.strategy in ("krum", "multikrum", "bulyan", "fedtrimmedavg"):
            raise ValueError(f"federation.fraction_train={fed.fraction_train:g}: federation.strategy={fed.strategy} "
                             f"needs a known number of updates per round; sample sites with fedavg, fedprox, fedadam, "
                             f"fedyogi, fedmedian or fedbn")
        m = self.model
        if self.privacy.enabled and m.family == "gan" and m.mask_conditioning and m.gan_fake_masks == "real":
            # only the discriminator is DP-trained: a generator fed the site's real masks would release them
            raise ValueError("model.gan_fake_masks=real with privacy.enabled: the GAN's generator is not trained with "
                             "DP-SGD, so it must not see the site's lesion masks; use model.gan_fake_masks=auto or "
                             "synthetic (data-independent masks), or privacy.enabled=false")
        if self.privacy.enabled and self.train.amp != "none":
            # fp16's GradScaler unscales .grad, not the per-sample gradients Opacus clips; bf16 per-sample
            # gradients (8-bit mantissa) would set the clipping norms: neither is checked against Opacus
            raise ValueError(f"train.amp={self.train.amp} with privacy.enabled: DP-SGD trains in float32 only; "
                             f"set train.amp=none")
        central = self.privacy.central
        if central.enabled and central.adaptive and fed.fraction_train < 1.0:
            raise ValueError("privacy.central.adaptive: the clipped count needs every site each round; with "
                             f"federation.fraction_train={fed.fraction_train:g} use a fixed clipping norm")
        if central.enabled and self.federation.strategy == "fedbn":
            raise ValueError("privacy.central.enabled: federation.strategy=fedbn keeps each site's normalisation "
                             "parameters out of the noised mean; use fedavg, fedprox, fedadam or fedyogi")
        if fed.secure_aggregation == "secaggplus":
            _check_secure_aggregation(self)
        if central.enabled and central.adaptive:
            from medgen.privacy.central import check_adaptive  # noqa: PLC0415  (needs flwr; only when used)

            check_adaptive(self)
        return self


def _check_secure_aggregation(cfg: Config) -> None:
    """What secaggplus cannot go with: whatever needs one site's update at the server."""
    fed, n = cfg.federation, len(cfg.sites.train)
    where = "federation.secure_aggregation=secaggplus"
    if fed.strategy in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"):
        raise ValueError(f"{where}: federation.strategy={fed.strategy} needs each site's update, and the server sees "
                         f"only their sum; use fedavg, fedprox, fedadam, fedyogi or fedbn")
    if cfg.privacy.central.enabled:
        _check_distributed_dp(cfg, where)
    if fed.max_update_ratio is not None:
        raise ValueError(f"{where}: federation.max_update_ratio={fed.max_update_ratio:g} compares each site's update "
                         f"norm with the others', and the server sees only their sum; leave it unset or null "
                         f"(federation.secagg_clip bounds each coordinate of each site's update instead)")
    if n < 3:
        raise ValueError(f"{where}: {n} training sites; with two, each learns the other's update from the global "
                         f"model (it knows its own): use at least 3")
    asked = max(1, math.ceil(fed.fraction_train * n)) if fed.fraction_train < 1.0 else n
    if asked < 3 <= n and not cfg.privacy.central.enabled:
        raise ValueError(f"{where}: federation.fraction_train={fed.fraction_train:g} asks {asked} of the {n} training "
                         f"sites a round, and no sum of fewer than 3 sites' updates is published: raise it to at "
                         f"least 3/{n} = {3 / n:.3g}")
    if fed.secagg_threshold is not None and fed.secagg_threshold > n:
        raise ValueError(f"federation.secagg_threshold={fed.secagg_threshold} is more than the {n} training sites")
    if fed.secagg_threshold is not None and 2 * fed.secagg_threshold <= n:
        raise ValueError(f"federation.secagg_threshold={fed.secagg_threshold} is not a majority of the {n} training "
                         f"sites (2t > n keeps a server that lies about who dropped from unmasking a site)")


def _check_distributed_dp(cfg: Config, where: str) -> None:
    """privacy.central under secaggplus: the sites clip and noise (medgen/privacy/central.py)."""
    central, fed = cfg.privacy.central, cfg.federation
    if central.adaptive:
        raise ValueError(f"privacy.central.adaptive: with {where} the sites clip their own updates and the server "
                         f"sees no clipped count (it would need a noised bit through the secure sum, not built); "
                         f"use a fixed privacy.central.clipping_norm")
    if fed.fraction_train < 1.0:
        raise ValueError(f"federation.fraction_train={fed.fraction_train:g}: with privacy.central and {where} the "
                         f"guarantee holds against the server, which draws the sample and knows who is in each sum, "
                         f"so sampling amplifies nothing against it; use federation.fraction_train=1")
    from medgen.privacy.central import (CLIP_SIGMAS, min_secagg_clip, noise_multiplier,  # noqa: PLC0415
                                        smallest_threshold)

    t = smallest_threshold(cfg)
    need = min_secagg_clip(noise_multiplier(cfg), central.clipping_norm, t)
    if fed.secagg_clip < need:
        raise ValueError(f"federation.secagg_clip={fed.secagg_clip:g}: with privacy.central and {where} each site "
                         f"adds noise of std z C / sqrt(t) before quantisation, and the quantiser's range must hold "
                         f"the noised update: set federation.secagg_clip >= {need:.4g} (privacy.central."
                         f"clipping_norm + {CLIP_SIGMAS:g} noise stds at t = {t}"
                         f"{'' if fed.secagg_threshold else ', the smallest threshold of a round of 3 sites'})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML), apply ``section.key=value`` overrides, validate.

    Override values are parsed as YAML (``--set data.spacing_mm=[1,1,1]``).
    Raises ConfigError naming the key path and what is allowed.
    """
    raw: dict[str, Any] = {}
    sources = []
    if path is not None:
        path = Path(path)
        sources.append(str(path))
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        raw = loaded
    for item in overrides:
        _apply_override(raw, item)
    if overrides:
        sources.append("--set overrides")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config ({' + '.join(sources)}):\n" + _explain(e)) from None


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``cfg`` with ``section.key=value`` overrides applied and validated like ``load_config``."""
    raw = cfg.model_dump(mode="json")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("invalid config (--set overrides):\n" + _explain(e)) from None


def load_policy(path: str | Path) -> SitePolicy:
    """A site's policy file (YAML mapping of SitePolicy keys); ConfigError naming the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read site policy {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"site policy {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"site policy {path}: top level must be a mapping of policy keys")
    try:
        return SitePolicy.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid site policy {path}:\n{_explain(e, SitePolicy)}") from None


def load_config_text(text: str) -> Config:
    """A config from YAML text written by medgen (how the server hands the run's config to the
    sites, and what a checkpoint holds). Text without ``model.space`` is from before the latent
    space (2026-12-01), so its DDPM was a pixel-space one (the other families ignore the key)."""
    try:
        raw = yaml.safe_load(text) or {}
        model = raw.get("model") if isinstance(raw, dict) else None
        if isinstance(model, dict):
            model.setdefault("space", "pixel")
        return Config.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"invalid config text: {e}") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None


def _allowed_keys(loc: tuple[Any, ...], model: type[BaseModel]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _explain(error: ValidationError, root: type[BaseModel] | None = None) -> str:
    lines = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1], root or Config)
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def dump_config(cfg: Config) -> str:
    """The config as YAML, every key spelled out (what a run records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
