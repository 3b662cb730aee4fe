"""What the server tells a site about a full evaluation, beyond the config: which classes some
training site held (a class that never trained gets no samples and no distances), and the anomaly
threshold fixed on the training sites' healthy validation slices (for a site without healthy
subjects of its own). Numbers and class indices only; a site reads them with
:meth:`EvaluationPlan.from_config`, which keeps what is well-formed and drops the rest, so nothing
the server sends here can make a site do more than score its own slices.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from medgen.data.dataset import HEALTHY, LESION

CLASSES_KEY = "trained-classes"
CALIBRATE_KEY = "send-calibration"
THRESHOLD_PREFIX = "calibration-threshold"  # + the anomaly setting's suffix ("", "@t=800") or an OUTLIER_* one
OUTLIER_LEVEL, OUTLIER_THRESHOLD = "/outlier-level", "/outlier"  # the intensity-outlier reference's calibration
# its per-side healthy quantiles (since 2026-12-03; a record without them gets the symmetric score)
OUTLIER_DARK, OUTLIER_BRIGHT = "/outlier-dark", "/outlier-bright"
_SUFFIX = re.compile(r"^((@[a-z_]+=[-+\w.]+)*|/outlier-level|/outlier|/outlier-dark|/outlier-bright)$")

#: ``threshold-source`` metric: which slices fixed the threshold of ``dice-at-threshold``.
THRESHOLD_SOURCES = {
    # e.g. a training site whose validation subjects are all patients: it scores them before the server
    # pools the training sites' quantiles, which go to the held-out sites only
    0: "no healthy subject here to hold apart, and no threshold from the training sites (the server passes "
       "theirs to held-out sites only)",
    1: "the site's own healthy subjects (half of them, at least one; those slices are not scored)",
    2: "the training sites' healthy validation slices (a pixel-weighted mean of their quantiles)",
    3: "the site's own slices outside the lesion masks (evaluation.calibration=outside-lesions: looks at the masks)",
}
OWN_HEALTHY, TRAINING_SITES, OUTSIDE_LESIONS = 1, 2, 3


@dataclass(frozen=True)
class EvaluationPlan:
    classes: tuple[int, ...] = (HEALTHY, LESION)
    thresholds: dict[str, float] = field(default_factory=dict)  # setting suffix ("" or "@t=800") -> threshold
    send_calibration: bool = False  # a training site: also send its healthy validation slices' quantiles

    def to_config(self) -> dict:
        """ConfigRecord entries for an evaluate message."""
        out = {CLASSES_KEY: [int(c) for c in self.classes], CALIBRATE_KEY: int(self.send_calibration)}
        out.update({THRESHOLD_PREFIX + suffix: float(v) for suffix, v in self.thresholds.items()})
        return out

    @classmethod
    def from_config(cls, config) -> EvaluationPlan:
        """The plan in an evaluate message's config (a ConfigRecord or a dict); malformed entries are
        ignored (the defaults: every class, no threshold from elsewhere)."""
        raw = config.get(CLASSES_KEY)
        classes = (HEALTHY, LESION)
        if isinstance(raw, (list, tuple)) and raw and all(isinstance(c, int) and c in (HEALTHY, LESION) for c in raw):
            classes = tuple(sorted(set(raw)))
        thresholds = {}
        for key, value in config.items():
            suffix = key[len(THRESHOLD_PREFIX):] if isinstance(key, str) and key.startswith(THRESHOLD_PREFIX) else None
            if (suffix is not None and _SUFFIX.match(suffix) and isinstance(value, (int, float))
                    and not isinstance(value, bool) and math.isfinite(value)):
                thresholds[suffix] = float(value)
        calibrate = config.get(CALIBRATE_KEY)
        return cls(classes, thresholds, calibrate in (1, True))


def pooled_thresholds(results: dict[str, dict]) -> dict[str, float]:
    """From the training sites' evaluate metrics: per anomaly setting, the pixel-weighted mean of
    their ``calibration-threshold<suffix>`` quantiles (weights ``calibration-pixels``). An
    approximation of the quantile of the pooled pixels, which would need the pixels' scores."""
    sums: dict[str, list[float]] = {}
    for metrics in results.values():
        pixels = metrics.get("calibration-pixels", 0)
        for key, value in metrics.items():
            suffix = key[len(THRESHOLD_PREFIX):]
            if key.startswith(THRESHOLD_PREFIX) and pixels > 0 and math.isfinite(value) and _SUFFIX.match(suffix):
                total = sums.setdefault(suffix, [0.0, 0.0])
                total[0] += value * pixels
                total[1] += pixels
    return {suffix: weighted / n for suffix, (weighted, n) in sums.items()}
