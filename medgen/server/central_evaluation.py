"""Central evaluation: the global model scored on a dataset the server itself holds
(``evaluation.server_data``, a site folder), exactly as a held-out site scores its own data. Its
records carry the site name ``"server"`` and stay out of the ``"global"`` mean over the sites.
The images are already at the server, so its report may show them (anomaly-map overlays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgen.client.task import evaluate_local, site_data
from medgen.config import Config
from medgen.data.dataset import SiteSlices
from medgen.data.errors import DataError, SiteDataError
from medgen.evaluation.plan import EvaluationPlan
from medgen.evaluation.site import evaluate_site
from medgen.models import build_model
from medgen.server.errors import FederationError

SERVER_SITE = "server"


def server_data(cfg: Config) -> SiteSlices:
    """The slices of ``evaluation.server_data`` (loaded once per process); FederationError naming the
    key and the bad files when they are unusable. Called before the first round, so a bad folder
    stops the run before any training."""
    try:
        return site_data(cfg, SERVER_SITE, Path(cfg.evaluation.server_data), heldout=True)[1]
    except (DataError, SiteDataError) as e:
        raise FederationError(f"evaluation.server_data={cfg.evaluation.server_data}: {e}") from e


def evaluate_server_data(cfg: Config, state: dict, full: bool, plan: EvaluationPlan | None = None
                         ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(metrics, report arrays) of the global model ``state`` on ``evaluation.server_data``; the full
    evaluation (distances, lesion detection) when ``full``, with ``plan`` as a held-out site's."""
    data = server_data(cfg)
    model = build_model(cfg)
    model.load_state_dict(state)
    metrics = evaluate_local(model, data, cfg)
    if not full:
        return metrics, {}
    own = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"share_images": True})})
    scores, arrays = evaluate_site(model, data, own, plan=plan)
    return {**metrics, **scores}, arrays
