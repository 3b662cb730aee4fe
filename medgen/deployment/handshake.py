"""The version handshake between the server and a site. The server puts its medgen version and
the model's fingerprint (every weight's name, shape and dtype for the run's config) in the run
config; a site whose own medgen or model code differs refuses, naming both versions, instead of
failing later on mismatched weights."""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version

from medgen.config import Config


def medgen_version() -> str:
    try:
        return version("medgen")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def model_fingerprint(cfg: Config) -> str:
    from medgen.models import build_model

    state = build_model(cfg).state_dict()
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()))
    return f"{cfg.model.family}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def server_handshake(cfg: Config) -> dict[str, str]:
    """What the server puts in the run config."""
    return {"medgen-version": medgen_version(), "model-fingerprint": model_fingerprint(cfg)}


def check_handshake(run_config: dict, cfg: Config, required: bool = True) -> str | None:
    """Why this site must refuse the run, or None. A deployed site (``required``) refuses a run
    config without the handshake keys. The simulation (``required=False``) has none: its ServerApp
    and ClientApps are the same installed medgen in one process tree, so there is nothing to mismatch."""
    theirs = str(run_config.get("medgen-version") or "")
    if required and not (theirs and run_config.get("model-fingerprint")):
        return ("version handshake missing: the run config has no medgen-version / model-fingerprint "
                "(runs are started with `medgen-server start`)")
    if theirs and theirs != medgen_version():
        return (f"medgen version mismatch: the server runs medgen {theirs}, this site has medgen "
                f"{medgen_version()}; install the same version at both ends")
    fingerprint = str(run_config.get("model-fingerprint") or "")
    if fingerprint and fingerprint != (ours := model_fingerprint(cfg)):
        return (f"model version mismatch: the server's {cfg.model.family} model is {fingerprint}, this site's "
                f"code builds {ours} for the same config; install the same medgen version at both ends")
    return None
