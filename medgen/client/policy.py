"""A site's policy against the study's config: what the site refuses, and what it decides itself.

Two checks, both before a single step is taken:

- :func:`violations` reads only the server's config (before any data is read): DP and secure
  aggregation required (and how many sites a secure sum holds), ε and δ budgets, noise and
  clipping bounds (the central noise the site adds under secure aggregation too), the protected unit, image sharing, lesion masks as model input, families,
  steps, the study itself;
- :func:`plan_violations` reads the round's DP plan (the noise solved from the site's data).

:func:`site_config` then replaces what the site owns: its slice cache, its InceptionV3 weights and
image sharing, whatever the server's config says.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from medgen.config import Config, SitePolicy, load_policy
from medgen.fileio import atomic_write
from medgen.privacy.dp import DPPlan


class PolicyRefusal(RuntimeError):
    """The server's config breaks the site's policy; the text names each policy key and value."""


def violations(cfg: Config, policy: SitePolicy, site: str, study: tuple[str, str]) -> list[str]:
    """Every way ``cfg`` breaks ``policy`` at ``site``, each naming the policy key and the server's
    value. ``study`` is (name, config fingerprint)."""
    p, dp, found = policy, cfg.privacy, []
    if p.allowed_studies and not set(study) & set(p.allowed_studies):
        found.append(f"allowed_studies: study {study[0]!r} (fingerprint {study[1]}) is not one this site agreed to "
                     f"({', '.join(p.allowed_studies)})")
    if cfg.model.family not in p.allow_families:
        found.append(f"allow_families: model.family={cfg.model.family} is not allowed ({', '.join(p.allow_families)})")
    if cfg.evaluation.share_images and not p.share_images:
        found.append("share_images: the study sets evaluation.share_images=true; this site sends no image")
    if cfg.model.mask_conditioning and not p.allow_mask_conditioning:
        found.append("allow_mask_conditioning: the study sets model.mask_conditioning=true (the site's lesion masks "
                     "as model input); this site does not allow it")
    if site not in cfg.sites.train:
        return found
    if p.require_secure_aggregation and cfg.federation.secure_aggregation == "off":
        found.append("require_secure_aggregation: the study sends clear updates (federation.secure_aggregation=off)")
    if cfg.federation.secure_aggregation != "off" and len(cfg.sites.train) < p.min_secagg_sites:
        found.append(f"min_secagg_sites: the study's secure sums hold at most {len(cfg.sites.train)} sites' updates "
                     f"(sites.train) < {p.min_secagg_sites}")
    if dp.central.enabled and cfg.federation.secure_aggregation != "off" and p.min_central_noise_multiplier > 0:
        from medgen.privacy.central import noise_multiplier  # noqa: PLC0415  (needs Opacus)

        if (z := noise_multiplier(cfg)) < p.min_central_noise_multiplier:
            how = "privacy.central.noise_multiplier" if dp.central.noise_multiplier is not None else \
                f"the noise multiplier solved from privacy.central.target_epsilon={dp.central.target_epsilon:g}"
            found.append(f"min_central_noise_multiplier: {how}={z:.4g} < {p.min_central_noise_multiplier:g} (the "
                         f"noise this site adds to its update under secure aggregation)")
    if p.require_dp and not dp.enabled:
        found.append("require_dp: the study trains without DP-SGD (privacy.enabled=false)")
    if cfg.train.local_steps is not None and cfg.train.local_steps > p.max_local_steps:
        found.append(f"max_local_steps: train.local_steps={cfg.train.local_steps} > {p.max_local_steps}")
    if not dp.enabled:
        return found
    if p.max_epsilon is not None:
        if dp.noise_multiplier is None and dp.target_epsilon > p.max_epsilon:
            found.append(f"max_epsilon: privacy.target_epsilon={dp.target_epsilon:g} > {p.max_epsilon:g}")
        if (budget := dp.budget(site)) is not None and budget > p.max_epsilon:
            found.append(f"max_epsilon: privacy.max_epsilon={budget:g} > {p.max_epsilon:g}")
    if dp.noise_multiplier is not None and dp.noise_multiplier < p.min_noise_multiplier:
        found.append(f"min_noise_multiplier: privacy.noise_multiplier={dp.noise_multiplier:g} "
                     f"< {p.min_noise_multiplier:g}")
    if dp.max_grad_norm > p.max_grad_norm:
        found.append(f"max_grad_norm: privacy.max_grad_norm={dp.max_grad_norm:g} > {p.max_grad_norm:g}")
    if p.privacy_unit == "subject" and dp.unit == "slice":
        found.append("privacy_unit: privacy.unit=slice protects one slice; this site requires subject")
    return found


def plan_violations(plan: DPPlan, policy: SitePolicy) -> list[str]:
    """What the round's DP plan breaks: the noise solved for the site's data. (Its steps are
    checked for every training round, DP or not, in the ClientApp.)"""
    if plan.noise_multiplier < policy.min_noise_multiplier:
        return [f"min_noise_multiplier: the study's privacy.target_epsilon needs noise multiplier "
                f"{plan.noise_multiplier:.3g} at this site < {policy.min_noise_multiplier:g}"]
    return []


def budget_delta(policy: SitePolicy, plan: DPPlan) -> float:
    """The δ at which the site accounts its budget: its own, or 1/(10 n) for its n protected units."""
    return policy.delta if policy.delta is not None else 1.0 / (10 * plan.units)


def budget(policy: SitePolicy | None, cfg: Config, site: str) -> tuple[float | None, str]:
    """The tighter of the site's policy budget and the study's ``privacy.max_epsilon``, and its name."""
    limits = [(b, k) for b, k in ((policy.max_epsilon if policy else None, "policy max_epsilon"),
                                  (cfg.privacy.budget(site), "privacy.max_epsilon")) if b is not None]
    return min(limits) if limits else (None, "privacy.max_epsilon")


def policy_summary(policy: SitePolicy) -> str:
    """What the policy allows, for the coordinator (its paths stay at the site)."""
    shown = policy.model_dump(mode="json", exclude={"cache_dir", "inception_weights"})
    return ", ".join(f"{k}={(','.join(map(str, v)) or 'any') if isinstance(v, list) else json.dumps(v)}"
                     for k, v in shown.items())


def refusal_text(site: str, found: list[str]) -> str:
    return f"site {site} refuses by its policy: " + "; ".join(found)


def site_config(cfg: Config, policy: SitePolicy | None, cache_dir: Path | None) -> Config:
    """``cfg`` with what the site owns put back: its slice cache (``cache_dir``; None keeps the
    config's, as in a simulation), which files it reads (inside its folder unless the policy says
    otherwise, no larger than its policy's bound), its InceptionV3 weights and, unless the policy
    allows it, no image sharing."""
    data, evaluation = {}, {}
    if cache_dir is not None:
        data["cache_dir"] = cache_dir
    if policy is not None:
        data["allow_external_paths"] = policy.allow_external_paths
        data["max_voxels"] = min(cfg.data.max_voxels, policy.max_voxels)
        evaluation["inception_weights"] = policy.inception_weights
        if not policy.share_images:
            evaluation["share_images"] = False
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data),
                                  "evaluation": cfg.evaluation.model_copy(update=evaluation)})


def policy_text(policy: SitePolicy) -> str:
    """``policy`` as the YAML of a policy file, each key under its description."""
    lines = ["# medgen site policy: what this site agrees to. Kept at the site; no server message changes it.",
             "# Every study's config is checked against it before any data is read."]
    for key, field in SitePolicy.model_fields.items():
        lines.append(f"\n# {field.description}")
        lines.append(yaml.safe_dump({key: policy.model_dump(mode="json")[key]}, sort_keys=False).rstrip())
    return "\n".join(lines) + "\n"


def ensure_policy(path: Path) -> tuple[SitePolicy, bool]:
    """The policy in ``path``; a missing file is written with the safe defaults (True: it was)."""
    if path.is_file():
        return load_policy(path), False
    text = policy_text(SitePolicy())
    atomic_write(path, lambda f: f.write(text.encode()))
    return SitePolicy(), True
