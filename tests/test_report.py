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
    last_c = [r for r in run.records() if r["phase"] == "evaluate" and r["site"] == "C"][-1]
    assert 0 < last_c["reference-prevalence"] < 0.5
    p = last_c["reference-prevalence"]
    assert abs(last_c["reference-all-brain-dice"] - 2 * p / (1 + p)) < 1e-9
    for site in "ABC":
        site_page = Page((run.path / "report" / f"site-{site}.html").read_text())
        assert "Records" in site_page.headings
        # the picture each site drew of its data into its own state folder, shown on its page
        assert "Data" in site_page.headings and (run.path / "sites" / site / "overview.png").is_file()
        assert site_page.images >= 1
    site_c = Page((run.path / "report" / "site-C.html").read_text())
    assert site_c.images >= 2  # ROC/PR + shared overlays
    # every lesion metric beside its no-model references, computed at the site on the same pixels
    row = site_c.cells.index("pixel-auprc")
    assert site_c.cells[row + 2:row + 4] == ["chance: prevalence", f"{last_c['reference-prevalence']:.4g}"]
    assert site_c.cells[row + 4] == f"{last_c.get('reference-outlier-pixel-auprc', float('nan')):.4g}"  # nan: no healthy subject to calibrate
    assert site_c.cells[row + 5].startswith(("beats", "does NOT beat"))
    final = json.loads((run.path / "report" / "metrics.json").read_text())["final"]
    last = [r for r in run.records() if r["phase"] == "evaluate" and r["site"] == "C"][-1]
    assert final["C"]["pixel-auroc"] == last["pixel-auroc"] and final["C"]["radfd-healthy"] == last["radfd-healthy"]
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
    assert "reference-prevalence" in compare.read_text()  # the references travel with the metrics


def test_site_page_tables_detection_by_anomaly_setting(tiny_cohort, tmp_path):
    """A family with an anomaly sweep (the DDPM's t): the site page tables every setting's scores,
    the configured one first, with their ROC curves."""
    cfg = tiny_cfg(tiny_cohort, "model.family=ddpm", "model.timesteps=50", "model.ddim_steps=5",
                   "model.anomaly_t=20", "federation.rounds=1", "evaluation.max_samples=4")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    run_federation(LocalGrid(3), cfg, run, log=lambda _: None)
    build_report(run.path)
    last = [r for r in run.records() if r["phase"] == "evaluate" and r["site"] == "C"][-1]
    cells = Page((run.path / "report" / "site-C.html").read_text()).cells
    settings = [c for c in cells if c.startswith("t=")]
    assert settings == ["t=20", "t=1", "t=2", "t=5", "t=10", "t=15"]
    row = cells.index("t=20")
    assert cells[row + 1] == f"{last['pixel-auroc@t=20']:.4g}" == f"{last['pixel-auroc']:.4g}"
    assert cells[cells.index("t=5") + 5] == f"{last['slice-auroc@t=5']:.4g}"
