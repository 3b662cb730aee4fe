"""Reports: the files exist, hold their sections, and their numbers equal the run's records; the
run directory and the report are strict JSON and state their provenance; one site, one colour."""

import base64
import hashlib
import io
import json
import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgen import provenance, strictjson
from medgen.config import load_config
from medgen.evaluation.plan import OWN_HEALTHY
from medgen.evaluation.report import (_curves, _table, build_report, compare_runs, lesion_words, n_behind,
                                      outlier_blind_side, site_colours, status_words, threshold_words, utility_rows,
                                      verdict, with_references)
from medgen.server.federation import run_federation
from medgen.server.rundir import RunDir
from test_federation import LocalGrid, tiny_cfg, tiny_cohort  # noqa: F401  (fixture)


class Page(HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.headings, self.images, self.cells, self._tag = [], 0, [], None
        self.pngs, self.colours, self.tables_in, self._open = [], {}, [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tag = tag
        self.images += tag == "img" and a.get("src", "").startswith("data:image/png;base64,")
        if tag == "img" and a.get("src", "").startswith("data:image/png;base64,"):
            self.pngs.append(a["src"].split(",", 1)[1])
        if "data-site" in a:
            self.colours[a["data-site"]] = a["data-colour"]
        if tag == "table":
            self.tables_in.append(self._open[-1] if self._open else None)  # the element holding the table
        if tag in ("div", "table", "body"):
            self._open.append(f"{tag}.{a.get('class', '')}")

    def handle_endtag(self, tag):
        if tag in ("div", "table", "body") and self._open:
            self._open.pop()

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
    # histograms, samples, ROC/PR: all embedded, nothing to fetch; one round: the curves are tables
    assert page.images == 3
    train_a = [r for r in run.records() if r["phase"] == "train" and r["site"] == "A"][-1]
    assert "training, per site: one value per site, so a table rather than a chart" in index.read_text()
    assert f"{train_a['loss']:.4g}" in page.cells
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
    # C's one healthy subject calibrates the outlier score too (and is not scored)
    assert last_c["threshold-source"] == OWN_HEALTHY
    assert site_c.cells[row + 4] == f"{last_c['reference-outlier-pixel-auprc']:.4g}"
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
    check_format_provenance_layout(run, index, compare, last_c)


def check_format_provenance_layout(run, index, compare, last_c):
    """The 1-round run of test_report_sections_and_numbers: strict JSON, provenance, n beside every
    score, tables that scroll, one colour per site, status in words, budget, verdicts."""
    report = run.path / "report"
    # strict JSON everywhere (NaN -> null: test_strict_json_in_the_run_directory)
    metrics = strictjson.loads((report / "metrics.json").read_text())
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert [strictjson.loads(line)["site"] for line in lines] == [r["site"] for r in run.records()]
    for path in [run.path / "status.json", run.path / "provenance.json", compare.parent / "compare.json",
                 *(run.path / "sites").glob("*/sent-messages.jsonl")]:
        for line in [path.read_text()] if path.suffix == ".json" else path.read_text().splitlines():
            strictjson.loads(line)
    with pytest.raises(ValueError, match="NaN"):
        strictjson.loads('{"a": NaN}')

    # provenance: in the run directory, in metrics.json, on every page
    (session,) = provenance.read(run.path)
    assert session["config-sha256"] == hashlib.sha256((run.path / "config.yaml").read_bytes()).hexdigest()
    assert {"medgen", "python", "platform", "git", "started"} <= session.keys()
    assert session["device"].startswith(f"{os.cpu_count()} CPUs")
    assert {"torch", "flwr", "opacus", "numpy", "nibabel"} <= {k for k, v in session["libraries"].items() if v}
    assert metrics["provenance"]["run"] == [session]
    assert metrics["provenance"]["report"]["config-sha256"] == session["config-sha256"]
    for page in [index, *report.glob("site-*.html"), compare]:
        parsed = Page(page.read_text())
        assert "Provenance" in parsed.headings, page
        assert session["libraries"]["torch"] in parsed.cells and session["config-sha256"][:16] in parsed.cells, page
        assert session["device"] in parsed.cells, page
        # every table sits in a box that scrolls sideways: nothing runs off the page
        assert parsed.tables_in and set(parsed.tables_in) == {"div.scroll"}, page

    # the counts behind the lesion scores, computed at the site on the scored slices
    assert last_c["n-scored-lesion-pixels"] / last_c["n-scored-pixels"] == pytest.approx(last_c["reference-prevalence"])
    assert 0 < last_c["n-scored-lesion-slices"] <= last_c["n-scored-slices"] <= 200
    site_c = (report / "site-C.html").read_text()
    assert f'{last_c["pixel-auroc"]:.4g}<span class="n"> n={int(last_c["n-scored-pixels"]):,} px (' in site_c
    assert f'{last_c["slice-auroc"]:.4g}<span class="n"> n={int(last_c["n-scored-slices"]):,} slices (' in site_c

    # one site, one colour: the key on every page and the charts agree
    colours = site_colours(["C", "B", "A"])
    assert colours == site_colours(["A", "B", "C", "A"]) and len(set(colours.values())) == len(colours)
    assert Page(index.read_text()).colours == {**{s: colours[s] for s in "ABC"}, "global": colours["global"]}
    assert Page(site_c).colours == Page(index.read_text()).colours
    assert Page(compare.read_text()).colours == {"C": colours["C"]}
    hist = png_colours(Page(index.read_text()).pngs[0])  # the index: histograms, samples, ROC/PR
    roc = png_colours(Page(site_c).pngs[1])  # site C: its data, ROC/PR, overlays
    assert {"A", "B", "C"} <= {s for s in "ABC" if has_colour(hist, colours[s])}  # intensity histograms
    assert has_colour(roc, colours["C"]) and not has_colour(roc, colours["A"])  # site C's ROC/PR: C's colour only

    # status in words, the budget, and the index's verdict on the lesion metrics
    cells = Page(index.read_text()).cells
    assert "completed: 1 of 1 rounds" in cells and "1 of 1" in cells
    assert "6" == cells[cells.index("site steps in all") + 1]  # 2 training sites x 3 local steps x 1 round
    verdict = next(c for c in cells if c.startswith(("✓", "✗")))
    trivial = {"pixel-auroc": 0.5, "pixel-auprc": last_c["reference-prevalence"],
               "dice-at-threshold": last_c["reference-all-brain-dice"],
               "slice-auroc": last_c["reference-brain-area-slice-auroc"]}
    beats = all(last_c[k] > ref for k, ref in trivial.items())  # NaN beats nothing
    assert verdict.startswith("✓" if beats else "✗ does NOT beat its reference: ")
    cmp_cells = Page(compare.read_text()).cells
    assert cmp_cells.count("3 (3 steps configured)") == 2 and cmp_cells.count("6") >= 2


def png_colours(data: str) -> np.ndarray:
    """The RGB pixels (N, 3) of a base64 PNG."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).reshape(-1, 3).astype(int)


def has_colour(rgb: np.ndarray, colour: str, tolerance: int = 12, at_least: int = 20) -> bool:
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(1) <= tolerance).sum()) >= at_least


def test_strict_json_in_the_run_directory(tmp_path):
    run = RunDir(tmp_path)
    run.log(1, "A", "evaluate", {"dice": float("nan"), "eps": float("inf"), "hist": [0.5, float("nan")], "n": 3})
    run.set_status("failed", round=1, error="x", score=float("-inf"))
    line = run.metrics_file.read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert strictjson.loads(line)["dice"] is None and strictjson.loads(line)["hist"] == [0.5, None]
    (rec,) = run.records()
    assert math.isnan(rec["dice"]) and math.isnan(rec["eps"]) and rec["hist"][0] == 0.5 and math.isnan(rec["hist"][1])
    assert strictjson.loads((tmp_path / "status.json").read_text())["score"] is None
    run.truncate_metrics(1)
    strictjson.loads(run.metrics_file.read_text())
    assert strictjson.dumps({"a": np.float32(np.nan), "b": np.arange(2), "c": np.int64(4)}) == '{"a": null, "b": [0, 1], "c": 4}'


def test_provenance_without_git(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "SOURCE", tmp_path)  # not a git checkout: no commit, no failure
    assert provenance.git_source() is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    monkeypatch.setattr(provenance, "SOURCE", provenance.Path(provenance.__file__).resolve().parent)
    assert provenance.git_source() is None
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    first, second = provenance.record(tmp_path), provenance.record(tmp_path)  # a start, then a --resume
    assert provenance.read(tmp_path) == [first, second] and first["git"] is None
    assert first["config-sha256"] == hashlib.sha256(b"seed: 0\n").hexdigest()


def test_n_status_and_single_points():
    m = {"radfd-healthy": 3.0, "kid-lesion@t=5": 1.0, "n-real-healthy": 64, "n-generated-healthy": 32.0,
         "n-real-lesion": 10, "n-scored-pixels": 5000, "n-scored-lesion-pixels": 50, "n-scored-slices": 12,
         "n-scored-lesion-slices": 3}
    assert n_behind("radfd-healthy", m) == "n=64 real, 32 gen."
    assert n_behind("kid-lesion@t=5", m) == "n=10 real, ? gen."
    assert n_behind("reference-outlier-pixel-auprc", m) == n_behind("dice-at-threshold", m) == "n=5,000 px (50 lesion)"
    assert n_behind("slice-auroc", m) == "n=12 slices (3 lesion)"
    assert n_behind("n-real-healthy", m) is None and n_behind("loss", m) is None
    assert n_behind("frd-healthy", {}) is None
    assert status_words({"status": "failed", "round": 2, "error": "OSError: disk"}, 5) == \
        "FAILED after 2 of 5 rounds: OSError: disk"
    assert status_words({"status": "completed", "round": 3, "stopped": "budget spent"}, 5) == \
        "completed: 3 of 5 rounds; stopped early: budget spent"
    assert status_words({"status": "missing"}, 5).startswith("unknown")
    colours = site_colours(["A", "B"])
    records = [{"round": r, "site": s, "phase": "train", "loss": 1.0 / r} for r in (1, 2) for s in "AB"]
    two = _curves(records, ["A", "B"], "train", ["loss"], "t", colours)
    assert two.startswith("<img") and "<table" not in two  # lines with markers
    one = _curves([r for r in records if r["round"] == 1], ["A", "B"], "train", ["loss"], "t", colours)
    assert "<img" not in one and Page(one).cells == ["A", "1", "1", "B", "1", "1"]  # a lone dot is a table row


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


def test_site_page_utility_table_with_its_references_and_n():
    """evaluation.utility: a site's utility-* numbers as a table, each arm's AUROC / AUPRC, then chance
    (0.5; AUPRC = prevalence), the brain-area score and the gain, with n; nothing without them."""
    m = {"utility-real-auroc": 0.8, "utility-real-auprc": 0.4, "utility-synthetic-auroc": 0.6,
         "utility-synthetic-auprc": 0.25, "utility-real+synthetic-auroc": 0.85, "utility-real+synthetic-auprc": 0.45,
         "utility-gain-auroc": 0.05, "utility-reference-brain-area-auroc": 0.7, "utility-reference-prevalence": 0.2,
         "n-utility-seeds": 3.0, "n-utility-train-slices": 1200.0, "n-utility-test-slices": 300.0,
         "n-utility-test-subjects": 6.0}
    found = utility_rows(m)
    assert found["n"] == "1,200 training slices, 300 test slices, 6 test subjects, 3 seeds (means over them)"
    cells = Page(_table(found["rows"], ["classifier", "test AUROC", "test AUPRC"])).cells
    assert cells == ["real (trained on real slices)", "0.8", "0.4", "synthetic (trained on samples only)", "0.6", "0.25",
                     "real+synthetic (trained on both)", "0.85", "0.45",
                     "↳ chance (AUPRC: the lesion prevalence of the test slices)", "0.5", "0.2",
                     "↳ brain area alone as the slice score (no model)", "0.7", "—",
                     "gain: real+synthetic − real", "0.05", "—"]
    assert utility_rows({"pixel-auroc": 0.9, "n-scored-slices": 10}) is None
    assert "{% if utility %}" in (Path(__file__).parents[1] / "medgen/evaluation/templates/site.html").read_text()


def _lesion_site(p=0.018):
    """A held-out site's final metrics as the issue found them on a white-matter-lesion site: the
    best Dice equals calling the whole brain lesion, 2p/(1+p); AUPRC equals the prevalence p."""
    return {"round": 1, "pixel-auroc": 0.74, "pixel-auprc": p, "best-dice-upper-bound": 2 * p / (1 + p),
            "reference-prevalence": p, "reference-all-brain-dice": 2 * p / (1 + p),
            "reference-outlier-pixel-auroc": 0.8, "reference-outlier-pixel-auprc": 0.05,
            "reference-outlier-best-dice-upper-bound": 0.2, "n-scored-pixels": 1000, "n-scored-lesion-pixels": 18}


def test_every_lesion_metric_has_its_references_right_under_it():
    m, p = _lesion_site(), 0.018
    assert 2 * p / (1 + p) == pytest.approx(0.035363, abs=1e-6)  # the 0.036
    rows = with_references(["pixel-auroc", "pixel-auprc", "best-dice-upper-bound", "loss"], [m, {"loss": 1.0}])
    assert [r[0] for r in rows] == [
        "pixel-auroc", "↳ chance: 0.5", "↳ reference-outlier-pixel-auroc (no model)",
        "pixel-auprc", "↳ reference-prevalence (chance: prevalence)", "↳ reference-outlier-pixel-auprc (no model)",
        "best-dice-upper-bound", "↳ reference-all-brain-dice (whole brain called lesion)",
        "↳ reference-outlier-best-dice-upper-bound (no model)", "loss"]
    values = [[c.value if hasattr(c, "value") else c for c in r[1:]] for r in rows]
    assert values[:9] == [[0.74, ""], [0.5, ""], [0.8, ""], [p, ""], [p, ""], [0.05, ""],
                          [2 * p / (1 + p), ""], [2 * p / (1 + p), ""], [0.2, ""]]
    assert values[9] == ["", 1.0]  # a column without the metric has no reference either
    assert rows[4][1].n == "n=1,000 px (18 lesion)"  # the reference stands on the same pixels
    # a reference not computed (no healthy slice for the outlier score) is shown as missing, not left out
    no_outlier = {k: v for k, v in m.items() if not k.startswith("reference-outlier-")}
    assert math.isnan(with_references(["pixel-auprc"], [no_outlier])[2][1])
    ok, text = verdict(m)
    assert not ok and text == ("does NOT beat its reference: pixel-auroc (intensity outlier); pixel-auprc "
                               "(chance: prevalence nor intensity outlier); best-dice-upper-bound "
                               "(whole brain called lesion nor intensity outlier)")
    better = {**m, "pixel-auroc": 0.9, "pixel-auprc": 0.1, "best-dice-upper-bound": 0.3}
    assert verdict(better) == (True, "all 3 lesion metrics beat their references")
    # an undefined metric (no threshold to cut the map at) beats nothing and says so, not "does NOT beat"
    undefined = {**better, "dice-at-threshold": math.nan, "reference-outlier-dice-at-threshold": 0.1}
    assert verdict(undefined) == (False, "does NOT beat its reference: dice-at-threshold (not computed)")
    assert with_references(["dice-at-threshold"], [undefined])[1][1].value == pytest.approx(0.035363, abs=1e-6)
    # metrics.json says the same in words, with where the threshold came from
    told = lesion_words({"D": {**better, "threshold-source": 2.0, "threshold": 0.25}, "A": {"loss": 1.0},
                         "global": better})
    assert told == {"D": {"beats-references": True, "verdict": "all 3 lesion metrics beat their references",
                          "threshold": "0.25, fixed on the training sites' healthy validation slices (a "
                                       "pixel-weighted mean of their quantiles)", "outlier-note": None}}
    # the outlier reference's threshold above what |x - median| can reach on the bright side (IXI: 0.413 > 0.411)
    blind = {"reference-outlier-threshold": 0.4132, "reference-outlier-bright-reach": 0.4112,
             "reference-outlier-dark-reach": 0.5888}
    assert outlier_blind_side(blind) == (
        "The intensity-outlier reference calls no pixel brighter than the healthy median here: |intensity - median| "
        "reaches at most 0.411 on that side (intensities are clipped into [0, 1]), not above its threshold 0.4132. "
        "Its Dice at the threshold counts the other side only; its AUROC, AUPRC and best Dice do not depend on the "
        "threshold.")
    assert outlier_blind_side({**blind, "reference-outlier-bright-reach": 0.42}) is None
    # the two-sided score (since 2026-12-03): reach in its units, threshold 1; blind only when a side's healthy
    # quantile itself sits at the clip
    two = {"reference-outlier-threshold": 1.0, "reference-outlier-bright-threshold": 0.4, "reference-outlier-dark-threshold":
           0.3, "reference-outlier-bright-reach": 1.0, "reference-outlier-dark-reach": 2.0}
    assert outlier_blind_side(two) == (
        "The intensity-outlier reference calls no pixel brighter than the healthy median here: its deviation over that "
        "side's healthy quantile reaches at most 1 (intensities are clipped into [0, 1]), not above its threshold 1: as "
        "many healthy pixels lie that far out. Its Dice at the threshold counts the other side only; its AUROC, AUPRC "
        "and best Dice do not depend on the threshold.")
    assert outlier_blind_side({**two, "reference-outlier-bright-reach": 1.5}) is None
    assert outlier_blind_side({}) is None
    assert outlier_blind_side({**blind, "reference-outlier-threshold": math.nan}) is None


def test_compare_page_puts_references_under_each_lesion_metric_and_flags_them(tmp_path):
    cfg = load_config(None, [])
    strong = {**_lesion_site(), "pixel-auroc": 0.9, "pixel-auprc": 0.1, "best-dice-upper-bound": 0.3,
              "threshold-source": 2.0, "threshold": 0.25}
    for name, metrics in (("weak", _lesion_site()), ("strong", strong)):
        run = RunDir(tmp_path / name)
        run.create(cfg)
        run.log(1, "D", "evaluate", metrics)
        run.set_status("completed", round=1)
    page = compare_runs([tmp_path / "weak", tmp_path / "strong"], tmp_path / "cmp").read_text()
    cells = Page(page).cells
    at = cells.index("pixel-auprc")
    assert cells[at:at + 9] == ["pixel-auprc", "0.018", "0.1", "↳ reference-prevalence (chance: prevalence)",
                                "0.018", "0.018", "↳ reference-outlier-pixel-auprc (no model)", "0.05", "0.05"]
    flags = cells[cells.index("lesion metrics vs their references") + 1:][:2]
    assert flags[0].startswith("✗ does NOT beat its reference: pixel-auroc (intensity outlier)")
    assert flags[1] == "✓ all 3 lesion metrics beat their references"
    # where each run's threshold came from (the weak run's records name none: an empty cell)
    assert cells[cells.index("Dice threshold fixed on") + 1].startswith("0.25, fixed on the training sites'")


def test_evaluation_charts_and_tables_carry_the_references_of_lesion_metrics():
    colours = site_colours(["A", "D"])
    records = [{"round": r, "site": "D", "phase": "evaluate", "loss": 1.0 / r, "pixel-auroc": 0.6 + 0.1 * r,
                "pixel-auprc": 0.02, "reference-prevalence": 0.01, "reference-outlier-pixel-auroc": 0.7,
                "n-scored-pixels": 100, "n-scored-lesion-pixels": 1} for r in (1, 2)]
    one = _curves(records[1:], ["A", "D"], "evaluate", ["loss", "pixel-auroc", "pixel-auprc"], "t", colours)
    assert "<img" not in one and re.findall(r"<th>(.*?)</th>", one) == [
        "site", "round", "loss", "pixel-auroc", "↳ chance", "↳ intensity outlier", "pixel-auprc",
        "↳ reference-prevalence", "↳ intensity outlier"]
    assert Page(one).cells == ["D", "2", "0.5", "0.8", "0.5", "0.7", "0.02", "0.01", "n/a"]  # outlier not computed
    two = _curves(records, ["A", "D"], "evaluate", ["pixel-auroc"], "t", colours)
    assert two.startswith("<img") and "<table" not in two
    rgb = png_colours(Page(two).pngs[0])
    assert has_colour(rgb, colours["D"]) and not has_colour(rgb, colours["A"])  # references in D's colour


def test_site_records_show_the_failed_secure_aggregation_steps_in_round_order(tmp_path):
    cfg = load_config(None, ["sites.train=[A,B,C]", "sites.heldout=[]"])
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    run.log(1, "A", "query", {"train-examples": 10})
    run.log(1, "A", "train", {"loss": 2.0, "steps": 3})
    run.log(1, "A", "secagg-unmask", {"error": "secure aggregation: malformed shares (bad length)"})
    run.log(1, "A", "secagg-keys", {"secagg-public": 1.0})  # a step that went well: not a row
    run.log(2, "A", "secagg-shares", {"error": "its SuperNode went offline"})
    run.set_status("completed", round=2)
    build_report(run.path)
    cells = Page((run.path / "report" / "site-A.html").read_text()).cells
    rows = [c for c in cells if c in ("train", "secagg-unmask", "secagg-shares", "secagg-keys", "query")]
    assert rows == ["train", "secagg-unmask", "secagg-shares"]
    assert "secure aggregation: malformed shares (bad length)" in cells and "its SuperNode went offline" in cells


def test_site_records_table_puts_the_references_beside_each_lesion_metric(tmp_path):
    """The per-round Records table of a site page: each lesion metric followed by its trivial
    reference and the intensity-outlier score of the same record (p = 0.018: random AUPRC 0.018,
    all-brain Dice 2p/(1+p) = 0.036/1.018 = 0.03536, chance AUROC 0.5, brain-area AUROC 0.93)."""
    cfg = load_config(None, ["sites.train=[A]", "sites.heldout=[D]"])
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    run.log(1, "A", "train", {"loss": 2.0, "steps": 3})
    run.log(1, "D", "evaluate", {**_lesion_site(), "loss": 1.5, "slice-auroc": 0.74,
                                 "reference-brain-area-slice-auroc": 0.93, "reference-outlier-slice-auroc": 0.61,
                                 "n-scored-slices": 40, "n-scored-lesion-slices": 12})
    run.set_status("completed", round=1)
    build_report(run.path)
    page = (run.path / "report" / "site-D.html").read_text()
    records = page.split("<h2>Records</h2>", 1)[1].split("</table>", 1)[0]
    header = re.findall(r"<th>(.*?)</th>", records)
    assert header == ["round", "phase", "loss", "pixel-auroc", "↳ chance", "↳ intensity outlier",
                      "pixel-auprc", "↳ reference-prevalence", "↳ intensity outlier",
                      "best-dice-upper-bound", "↳ reference-all-brain-dice", "↳ intensity outlier",
                      "slice-auroc", "↳ reference-brain-area-slice-auroc", "↳ intensity outlier", "error"]
    assert Page(records).cells == ["1", "evaluate", "1.5", "0.74", "0.5", "0.8", "0.018", "0.018", "0.05",
                                   "0.03536", "0.03536", "0.2", "0.74", "0.93", "0.61"]  # no error
    # the n behind each metric, in small type beside it
    assert '<td>0.018<span class="n"> n=1,000 px (18 lesion)</span></td>' in records
    assert '<td>0.74<span class="n"> n=40 slices (12 lesion)</span></td>' in records
    assert "↳: right after each lesion metric" in page
    # a training site's train record has no lesion metric, hence no reference either
    train = (run.path / "report" / "site-A.html").read_text().split("<h2>Records</h2>", 1)[1].split("</table>")[0]
    assert Page(train).cells == ["1", "train", "2"] and train.count("<td") == len(header)  # the rest empty
    assert "↳: right after each lesion metric" not in (run.path / "report" / "site-A.html").read_text()


def test_a_site_without_a_threshold_is_told_why_in_words():
    """Source 0 (no threshold): a training site whose validation subjects are all patients is not
    given the pooled threshold, which goes to held-out sites only."""
    assert threshold_words({"threshold-source": 0.0, "threshold": math.nan}) == (
        "none: no healthy subject here to hold apart, and no threshold from the training sites (the server passes "
        "theirs to held-out sites only)")
    assert threshold_words({"threshold-source": 1.0, "threshold": 0.1068, "n-calibration-slices": 112.0}) == (
        "0.1068, fixed on the site's own healthy subjects (half of them, at least one; those slices are not scored) "
        "(112 slices)")
    assert threshold_words({"loss": 1.0}) is None
