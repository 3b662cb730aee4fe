"""Reports: the files exist, hold their sections, and their numbers equal the run's records."""

import json
import re
from html.parser import HTMLParser

import numpy as np

from medgen.evaluation.report import build_report, compare_runs
from medgen.server.federation import run_federation
from medgen.server.rundir import RunDir
from test_federation import LocalGrid, tiny_cfg, tiny_cohort  # noqa: F401  (fixture)


class Page(HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.headings, self.images, self.cells, self._tag = [], 0, [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        self.images += tag == "img" and dict(attrs).get("src", "").startswith("data:image/png;base64,")

    def handle_data(self, data):
        if self._tag == "h2":
            self.headings.append(data.strip())
        elif self._tag == "td":
            self.cells.append(data.strip())


def test_report_sections_and_numbers(tiny_cohort, tmp_path):
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", "evaluation.share_images=true")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    run_federation(LocalGrid(3), cfg, run, log=lambda _: None)
    index = build_report(run.path)
    page = Page(index.read_text())
    for section in ("Configuration", "Data per site", "Training", "Evaluation over rounds", "Final metrics",
                    "Samples", "Lesion detection"):
        assert section in page.headings
    voxel_cells = [c for c in page.cells if re.fullmatch(r"[\d.]+x[\d.]+x[\d.]+ \(\d+\)(, .*)?", c)]
    assert len(voxel_cells) == 3  # one per site, from the scans' headers
    assert any(c.startswith("LPS") for c in page.cells) and any(c.startswith("PSR") for c in page.cells)
    assert page.images >= 5  # histograms, curves, samples, ROC/PR: all embedded, nothing to fetch
    assert "http" not in index.read_text().replace("http://www.w3.org", "")
    for site in "ABC":
        site_page = Page((run.path / "report" / f"site-{site}.html").read_text())
        assert "Records" in site_page.headings
    assert Page((run.path / "report" / "site-C.html").read_text()).images >= 2  # ROC/PR + shared overlays
    final = json.loads((run.path / "report" / "metrics.json").read_text())["final"]
    last = [r for r in run.records() if r["phase"] == "evaluate" and r["site"] == "C"][-1]
    assert final["C"]["pixel-auroc"] == last["pixel-auroc"] and final["C"]["frd-healthy"] == last["frd-healthy"]
    assert f"{last['pixel-auroc']:.4g}" in page.cells
    # the recorded AUROC is the area under the ROC curve the site saved for the report
    with np.load(run.path / "evaluation" / "round-0001" / "C.npz") as arrays:
        area = np.trapezoid(arrays["roc-tpr"], arrays["roc-fpr"])
    assert abs(area - last["pixel-auroc"]) < 0.01

    other = RunDir(tmp_path / "other")
    other.create(cfg)
    run_federation(LocalGrid(3), cfg, other, log=lambda _: None)
    compare = compare_runs([run.path, other.path], tmp_path / "cmp")
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [(r["run"], r["site"]) for r in rows] == [("run", "C"), ("other", "C")]
    assert rows[0]["pixel-auroc"] == rows[1]["pixel-auroc"]  # same seed, same config: same numbers
    assert Page(compare.read_text()).images == 1
