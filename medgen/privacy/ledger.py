"""A site's privacy ledger: every DP-SGD step the site ever took on its data, kept at the site.

The ledger is a JSON file in the site's state directory. Each entry is one round of local training
(noise multiplier, sampling rate, steps). ε is computed by Opacus' RDP accountant over the whole
history, so privacy composes over rounds, restarts, `--resume` and separate runs on the same state
directory. Nothing here can be raised by the server: the budget is the site's own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from medgen.fileio import atomic_write


class BudgetExceeded(RuntimeError):
    """Training one more round would spend more than the site's own budget."""


class PrivacyLedger:
    FILE = "privacy-ledger.json"

    def __init__(self, state_dir: str | Path, site: str):
        self.path = Path(state_dir) / self.FILE
        self.site = site
        self.history: list[dict] = []
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("site") != site:
                raise ValueError(f"{self.path} is the ledger of site {data.get('site')!r}, not {site!r}")
            self.history = data["history"]

    def epsilon(self, delta: float, extra: list[tuple[float, float, int]] = ()) -> float:
        """ε at ``delta`` over the whole history (plus ``extra`` (noise, rate, steps) not yet taken)."""
        steps = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.history] + list(extra)
        if not steps:
            return 0.0
        from medgen._compat.opacus import rdp_epsilon  # noqa: PLC0415  (importing Opacus takes seconds)

        return rdp_epsilon(steps, delta)

    def check_budget(self, planned: tuple[float, float, int], delta: float, max_epsilon: float | None,
                     key: str = "privacy.max_epsilon") -> float:
        """ε after ``planned`` (noise, rate, steps); raises BudgetExceeded above ``max_epsilon``
        (the budget named ``key`` in the message)."""
        after = self.epsilon(delta, [planned])
        if max_epsilon is not None and after > max_epsilon:
            raise BudgetExceeded(f"site {self.site}: one more round would spend ε={after:.3g} > {key}="
                                 f"{max_epsilon:g} (spent so far ε={self.epsilon(delta):.3g} at δ={delta:.2g})")
        return after

    def spend(self, dp, round_: int) -> dict[str, float]:
        """Record one round of ``dp`` (a DPPlan) and return its numbers with the new total ε."""
        self.record(dp.noise_multiplier, dp.sample_rate, dp.steps, round=round_, unit=dp.unit, delta=dp.delta)
        return {**dp.metrics(), "epsilon": self.epsilon(dp.delta)}

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, **info) -> None:
        """Append one round of DP-SGD steps; written atomically before the weights leave the site."""
        self.history.append({"noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps,
                             "time": round(time.time(), 3), **info})
        text = json.dumps({"site": self.site, "history": self.history}, indent=1)
        atomic_write(self.path, lambda f: f.write(text.encode()))
