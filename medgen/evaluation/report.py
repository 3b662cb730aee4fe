"""Reports: `<run>/report/index.html`, `site-<name>.html` and `metrics.json`, rebuilt from what the
run directory holds (config, metrics.jsonl, samples, the sites' evaluation arrays). Self-contained:
every figure is an embedded PNG, so the files open offline and can be mailed around."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from medgen.client import sent_log  # noqa: E402
from medgen.server.rundir import RunDir  # noqa: E402

HEADLINE = ["loss", "radfd-healthy", "radfd-lesion", "kid-healthy", "kid-lesion", "precision-healthy", "recall-healthy",
            "ms-ssim-healthy", "ms-ssim-real-healthy", "ms-ssim-lesion", "ms-ssim-real-lesion", "fid-healthy", "fid-lesion", "pixel-auroc", "pixel-auprc",
            "dice-at-threshold", "best-dice-upper-bound", "slice-auroc", "epsilon", "memorisation-fraction",
            "memorisation-baseline", "mia-auc"]
DETECTION = ["pixel-auroc", "pixel-auprc", "dice-at-threshold", "best-dice-upper-bound", "slice-auroc"]
AUDIT = ["memorisation-fraction", "memorisation-baseline", "memorisation-ratio-median", "memorisation-baseline-median",
         "nn-train-rms", "nn-heldout-rms", "memorisation-samples", "mia-auc"]
_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#666;font-size:90%}h2{border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:1.6em}"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _file_png(path: Path, width: int = 640) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img style="width:{width}px;image-rendering:pixelated" src="data:image/png;base64,{data}">'


def _table(rows: list[list], header: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _curves(records: list[dict], sites: list[str], phase: str, keys: list[str], title: str) -> str:
    keys = [k for k in keys if any(k in r for r in records if r["phase"] == phase and r["site"] in sites)]
    if not keys:
        return ""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for site in sites:
            pts = [(r["round"], r[key]) for r in records if r["phase"] == phase and r["site"] == site and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=site)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("round")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _roc_pr(arrays: dict[str, dict]) -> str:
    sites = [s for s, a in arrays.items() if "roc-fpr" in a]
    if not sites:
        return ""
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(8, 3.4))
    for site in sites:
        a = arrays[site]
        roc.plot(a["roc-fpr"], a["roc-tpr"], label=site)
        pr.plot(a["pr-recall"], a["pr-precision"], label=site)
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="pixel ROC")
    pr.set(xlabel="recall", ylabel="precision", title="pixel precision-recall")
    roc.legend(fontsize=8)
    return _png(fig)


def _by_setting(metrics: dict, a: dict) -> str:
    """Lesion detection per anomaly-map setting (keys such as ``pixel-auroc@t=800``: the family's
    ``anomaly_sweep``, the configured setting first) as a table, with their ROC curves."""
    settings = list(dict.fromkeys(k.split("@", 1)[1] for k in metrics if "@" in k))
    if len(settings) < 2:
        return ""
    rows = [[s] + [metrics.get(f"{k}@{s}", "") for k in DETECTION] for s in settings]
    parts = ['<p class="note">By anomaly-map setting (the first is the configured one, shown above):</p>',
             _table(rows, ["setting", *DETECTION])]
    if all(f"roc-fpr@{s}" in a for s in settings):
        fig, ax = plt.subplots(figsize=(4.4, 3.4))
        for s in settings:
            ax.plot(a[f"roc-fpr@{s}"], a[f"roc-tpr@{s}"], label=s)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="pixel ROC by setting")
        ax.legend(fontsize=8)
        parts.append(_png(fig))
    return "".join(parts)


# metric: (its reference without a model, name of that reference)
_REFERENCES = {"pixel-auroc": (None, "chance: 0.5"), "pixel-auprc": ("reference-prevalence", "chance: prevalence"),
               "dice-at-threshold": ("reference-all-brain-dice", "whole brain called lesion"),
               "slice-auroc": ("reference-brain-area-slice-auroc", "slice brain area")}


def _references(metrics: dict) -> str:
    """Each lesion metric of a site beside its trivial references on the same pixels and slices
    (see ``anomaly.references``), and whether the model beats both."""
    if "reference-prevalence" not in metrics:
        return ""
    rows = []
    for key, (ref_key, ref_name) in _REFERENCES.items():
        if key not in metrics:
            continue
        trivial = 0.5 if ref_key is None else metrics.get(ref_key, float("nan"))
        outlier = metrics.get(f"reference-outlier-{key}", float("nan"))
        value = metrics[key]
        refs = ((ref_name, trivial), ("intensity outlier", outlier))
        missing = [name for name, ref in refs if np.isnan(ref)]
        not_beaten = [name for name, ref in refs if not np.isnan(ref) and not value > ref]
        verdict = ("does NOT beat " + " nor ".join(not_beaten) if not_beaten else
                   "beats both" if not missing else "beats what was computed")
        verdict += f" ({', '.join(missing)}: not computed, e.g. no healthy subject to calibrate)" if missing else ""
        rows.append([key, value, ref_name, trivial, outlier, verdict])
    return ('<p class="note">Every lesion metric beside what needs no model, on the same scored pixels and slices. '
            "Intensity outlier: |intensity - median healthy brain intensity|, post-processed and thresholded like "
            "the model's maps (README, \"Lesion detection\").</p>"
            + _table(rows, ["metric", "model", "trivial reference", "its value", "intensity outlier (no model)", ""]))


def _overlays(a: dict) -> str:
    if "overlay-images" not in a:
        return '<p class="note">No overlays: this site does not share images (evaluation.share_images).</p>'
    n = len(a["overlay-images"])
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.4), squeeze=False)
    for i in range(n):
        for row, (img, cmap) in enumerate(((a["overlay-images"][i], "gray"), (a["overlay-maps"][i], "magma"))):
            ax = axes[row][i]
            ax.imshow(img, cmap=cmap)
            ax.contour(a["overlay-lesion"][i], [0.5], colors="cyan", linewidths=0.8)
            ax.axis("off")
    axes[0][0].set_title("slice + lesion outline", fontsize=8, loc="left")
    axes[1][0].set_title("anomaly map", fontsize=8, loc="left")
    return _png(fig)


def _privacy(records: list[dict], site: str, metrics: dict, a: dict) -> str:
    """A site's "Privacy and memorisation" section: epsilon over rounds, the audit's numbers, the
    distribution of d_train / d_heldout against the baseline, and the closest pairs."""
    parts = ["<h2>Privacy and memorisation</h2>",
             _curves(records, [site, "global"], "train", ["epsilon", "central-epsilon"], f"site {site}: privacy spent")
             or "<p>No differential privacy in this run.</p>"]
    if "memorisation-fraction" not in metrics:
        return "".join(parts + ["<p>No memorisation audit at this site (it needs training and held-out slices).</p>"])
    threshold = float(a["memorisation-threshold"][0]) if "memorisation-threshold" in a else float("nan")
    parts.append(_table([[k, metrics[k]] for k in AUDIT if k in metrics], ["audit", "value"]))
    parts.append(f'<p class="note">Flagged: d_train / d_heldout &lt; {threshold:.3g} (nearest training vs held-out '
                 "slice, pixel RMS). Baseline: the same share for real slices neither set holds (leave one "
                 "training subject out). mia-auc: loss-based membership inference, 0.5 = no signal. README, "
                 '"Memorisation audit".</p>')
    if "memorisation-ratios" in a:
        fig, ax = plt.subplots(figsize=(6, 2.6))
        bins = np.linspace(0, max(1.5, float(np.max(a["memorisation-ratios"], initial=0))), 40)
        ax.hist(a["memorisation-ratios"], bins, alpha=0.6, density=True, label="generated")
        if len(a.get("memorisation-baseline-ratios", [])):
            ax.hist(a["memorisation-baseline-ratios"], bins, alpha=0.6, density=True, label="baseline (real, unseen)")
        ax.axvline(threshold, color="red", linestyle=":", label="threshold")
        ax.set(xlabel="d_train / d_heldout", title="nearest-neighbour distance ratio")
        ax.legend(fontsize=8)
        parts.append(_png(fig))
    if "memorisation-generated" not in a:
        rows = [[i + 1, float(t), float(h)] for i, (t, h) in
                enumerate(zip(a.get("memorisation-pair-d-train", []), a.get("memorisation-pair-d-heldout", [])))]
        return "".join(parts + ['<p class="note">Closest pairs: numbers only, this site does not share images '
                                "(evaluation.share_images).</p>", _table(rows, ["pair", "d_train", "d_heldout"])])
    n = len(a["memorisation-generated"])
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n), squeeze=False)
    for i in range(n):
        for j, key in enumerate(("memorisation-generated", "memorisation-train", "memorisation-heldout")):
            axes[i][j].imshow(a[key][i], cmap="gray", vmin=0, vmax=1)
            axes[i][j].axis("off")
        axes[i][1].set_title(f"nearest training, d={a['memorisation-pair-d-train'][i]:.3g}", fontsize=8)
        axes[i][2].set_title(f"nearest held-out, d={a['memorisation-pair-d-heldout'][i]:.3g}", fontsize=8)
        axes[i][0].set_title("generated", fontsize=8)
    fig.suptitle("closest pairs (lowest d_train / d_heldout)", fontsize=10)
    return "".join(parts + [_png(fig)])


def _histograms(records: list[dict], sites: list[str]) -> str:
    hists = {r["site"]: r["intensity-hist"] for r in records if r["phase"] == "query" and "intensity-hist" in r}
    if not hists:
        return ""
    fig, ax = plt.subplots(figsize=(6, 2.8))
    for site in sites:
        if site in hists:
            h = np.asarray(hists[site])
            ax.plot(np.linspace(0, 1, len(h)), h, label=site)
    ax.set(xlabel="normalised brain intensity", ylabel="share of brain pixels", title="intensity histograms")
    ax.legend(fontsize=8)
    return _png(fig)


def final_metrics(records: list[dict]) -> dict[str, dict]:
    """The last evaluation of every site (and "global"): {site: {metric: value, "round": r}}."""
    out: dict[str, dict] = {}
    for r in records:
        if r["phase"] == "evaluate":
            out[r["site"]] = {k: v for k, v in r.items() if k not in ("site", "phase", "time")}
    return out


def _central(records: list[dict]) -> str:
    last = privacy_spent(records).get("global")
    if not last or "central-epsilon" not in last:
        return ""
    return (f'<p>Central DP at the server: site-level (ε = {last["central-epsilon"]:.3g}, δ = {last["central-delta"]:g}) '
            f'after round {last["round"]} — a guarantee for a whole site, not for a patient (README, "Central DP").</p>'
            + _curves(records, ["global"], "train", ["central-epsilon", "central-clipping-norm", "central-noise-norm",
                                                     "central-mean-norm"], "central DP, per round"))


def privacy_spent(records: list[dict]) -> dict[str, dict]:
    """The last privacy numbers of every site (DP-SGD's sample-level epsilon) and of "global" (central
    DP's site-level epsilon): {site: {"round": r, "epsilon" | "central-epsilon": e, ...}}."""
    out: dict[str, dict] = {}
    for r in records:
        if r["phase"] == "train" and ("epsilon" in r or "central-epsilon" in r):
            out[r["site"]] = {k: v for k, v in r.items() if k == "round" or "epsilon" in k or "delta" in k}
    return out


def _sent(run: RunDir, records: list[dict], site: str) -> str:
    """A site's "What left the site" section: its refusals, and its own sent-message log where the
    run holds it (a simulation; a deployed site keeps it in its state folder)."""
    parts = ["<h2>What left the site</h2>"]
    refused = [[r["round"], r["phase"], r["refused"]] for r in records if r["site"] == site and "refused" in r]
    if refused:
        parts += ["<p>The site refused:</p>", _table(refused, ["round", "phase", "reason"])]
    entries = sent_log.read(run.path / "sites" / site)
    if not entries:
        return "".join(parts + [f'<p class="note">The site keeps its log of every message it sent in its state '
                                f"folder ({sent_log.FILE}; `medgen-client sent --site {html.escape(site)}`).</p>"])
    parts.append(_table(sent_log.summary(entries), ["message", "status", "sent", "bytes", "records and keys",
                                                    "image-shaped arrays"]))
    parts.append(f'<p class="note">From the site\'s own log ({len(entries)} messages, {sent_log.FILE} in its state '
                 "folder), written before each message left.</p>")
    return "".join(parts)


def _site_picture(run: RunDir, site: str) -> str:
    """A site's "Data" section: the picture of its slices (medgen.data.picture) drawn by the site
    into its state folder, where the run holds that folder (a simulation, `medgen evaluate`)."""
    path = run.path / "sites" / site / "overview.png"
    if not path.is_file():
        return ("<h2>Data</h2><p class=\"note\">No picture of this site's data in the run: it stays at the site "
                "(<code>overview.png</code> in its state folder, or <code>medgen data check DIR</code>).</p>")
    return ("<h2>Data</h2><p class=\"note\">What this site trains or is scored on: a few of its scans, axial slices "
            "across the brain as preprocessed, brain mask (yellow) and lesion (red) outlined. Drawn at the site, "
            "kept in its state folder.</p>" + _file_png(path, width=900).replace("image-rendering:pixelated", ""))


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>")


def build_report(run_dir: str | Path) -> Path:
    """Write the run's report; returns ``<run>/report/index.html``."""
    run = RunDir(run_dir)
    cfg = yaml.safe_load((run.path / "config.yaml").read_text())
    records, status = run.records(), run.status()
    seen = [r["site"] for r in records if r["site"] != "global"]
    sites = [s for s in cfg["sites"]["train"] + cfg["sites"]["heldout"] if s in seen]
    sites += [s for s in dict.fromkeys(seen) if s not in sites]  # e.g. a folder scored by `medgen evaluate`
    heldout = cfg["sites"]["heldout"]
    evaluations = sorted((run.path / "evaluation").glob("round-*"))
    arrays = {p.stem: dict(np.load(p)) for p in evaluations[-1].glob("*.npz")} if evaluations else {}
    final = final_metrics(records)
    out = run.path / "report"
    out.mkdir(exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"status": status, "final": final, "privacy": privacy_spent(records)},
                                                 indent=1))

    summary = [[k, json.dumps(v)] for k, v in (
        ("model", cfg["model"]["family"]), ("strategy", cfg["federation"]["strategy"]),
        ("rounds", cfg["federation"]["rounds"]), ("training sites", cfg["sites"]["train"]),
        ("held-out sites", heldout), ("data", cfg["data"]["root"] or "phantom cohort"),
        ("image size", cfg["data"]["image_size"]), ("privacy", cfg["privacy"] if cfg["privacy"]["enabled"] else "off"),
        ("status", status))]
    shown = [k for k in HEADLINE if any(k in m for m in final.values())]
    columns = [s for s in sites + ["global"] if s in final]
    table = _table([[k] + [final[s].get(k, "") for s in columns] for k in ["round", *shown]],
                   ["metric"] + [f"{s} (held out)" if s in heldout else s for s in columns])
    counts = [[r["site"], r.get("train-examples", ""), r.get("eval-examples", ""), r.get("lesion-slices", ""),
               r.get("subjects", ""), r.get("skipped-files", ""), r.get("voxel-sizes", ""), r.get("orientations", ""),
               r.get("error", r.get("refused", "")), r.get("policy", "none (simulated)")]
              for r in records if r["phase"] == "query"]
    samples = sorted(run.samples.glob("round-*.png"))
    weights_note = "" if any(k.startswith("fid-") for m in final.values() for k in m) else \
        '<p class="note">FID: unavailable (no InceptionV3 weights found at the sites; see evaluation.inception_weights).' \
        " The radiomics distances (RadFD-20, KID, precision/recall) need no downloaded weights.</p>"
    body = [
        "<h2>Configuration</h2>", _table(summary, ["key", "value"]),
        "<h2>Data per site</h2>", _table(counts, ["site", "training slices", "evaluation slices", "lesion slices",
                                                  "subjects", "bad files skipped", "scan voxel sizes (mm)",
                                                  "scan orientations",
                                                  "problem or refusal", "site policy"]), _histograms(records, sites),
        "<h2>Training</h2>", _curves(records, sites, "train", ["loss", "epsilon"], "training, per site") or
        "<p>No training in this run.</p>",
        _central(records),
        "<h2>Evaluation over rounds</h2>",
        _curves(records, sites, "evaluate", ["loss", "radfd-healthy", "pixel-auroc", "dice-at-threshold"],
                "evaluation (training sites: validation subjects; held-out sites: all)"),
        "<h2>Final metrics</h2>", table,
        '<p class="note">"global" is the example-weighted mean over the sites. Definitions: README, "Evaluation".</p>',
        weights_note,
        "<h2>Samples</h2>", '<p class="note">First row healthy, second row lesion.</p>',
        _file_png(samples[-1]) if samples else "<p>No samples.</p>",
        "<h2>Lesion detection</h2>", _roc_pr(arrays) or "<p>No site with lesion masks evaluated.</p>",
    ]
    body += [f'<p><a href="site-{s}.html">site {html.escape(s)}</a></p>' for s in sites]
    (out / "index.html").write_text(_page(f"medgen report — {run.path.name}", body))
    for site in sites:
        mine = [r for r in records if r["site"] == site]
        rows = [[r["round"], r["phase"]] + [r.get(k, "") for k in ["loss", *shown[1:]]] + [r.get("error", r.get("refused", ""))]
                for r in mine if r["phase"] in ("train", "evaluate")]
        page = [f"<p>{'held-out site: never trains' if site in heldout else 'training site'}</p>",
                _site_picture(run, site),
                "<h2>Records</h2>", _table(rows, ["round", "phase", "loss", *shown[1:], "error"]),
                _curves(records, [site], "train", ["loss", "epsilon"], f"site {site}: training"),
                _curves(records, [site], "evaluate", ["loss", "pixel-auroc"], f"site {site}: evaluation"),
                "<h2>Lesion detection</h2>", _roc_pr({site: arrays[site]} if site in arrays else {}) or
                "<p>No lesion evaluation at this site.</p>", _references(final.get(site, {})),
                _by_setting(final.get(site, {}), arrays.get(site, {})), _overlays(arrays.get(site, {})),
                _privacy(records, site, final.get(site, {}), arrays.get(site, {})),
                _sent(run, records, site),
                '<p><a href="index.html">back to the run</a></p>']
        (out / f"site-{site}.html").write_text(_page(f"medgen report — site {site}", page))
    return out / "index.html"


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One table and one chart of the held-out sites' final metrics of several runs (e.g.
    federated vs `medgen train --site` vs `--centralized`)."""
    rows, runs = [], []
    for d in run_dirs:
        run = RunDir(d)
        cfg = yaml.safe_load((run.path / "config.yaml").read_text())
        final = final_metrics(run.records())
        for site in cfg["sites"]["heldout"]:
            if site in final:
                runs.append((run.path.name, site, final[site]))
    references = ["reference-prevalence", "reference-all-brain-dice", *[f"reference-outlier-{k}" for k in _REFERENCES]]
    keys = [k for k in [*HEADLINE, *references] if any(k in m for _, _, m in runs)]
    rows = [[name, site] + [m.get(k, "") for k in keys] for name, site, m in runs]
    plotted = [k for k in ("pixel-auroc", "pixel-auprc", "dice-at-threshold", "slice-auroc") if k in keys]
    chart = ""
    if plotted and runs:
        fig, ax = plt.subplots(figsize=(7, 3))
        width = 0.8 / len(runs)
        for i, (name, site, m) in enumerate(runs):
            ax.bar(np.arange(len(plotted)) + i * width, [m.get(k, np.nan) for k in plotted], width, label=f"{name} / {site}")
        ax.set_xticks(np.arange(len(plotted)) + 0.4 - width / 2, plotted)
        ax.legend(fontsize=7)
        ax.set_title("held-out sites: lesion detection")
        chart = _png(fig)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.html").write_text(_page("medgen comparison", [_table(rows, ["run", "held-out site"] + keys), chart]))
    (out / "compare.json").write_text(json.dumps([{"run": n, "site": s, **m} for n, s, m in runs], indent=1))
    return out / "compare.html"
