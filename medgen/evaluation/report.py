"""Reports: `<run>/report/index.html`, `site-<name>.html` and `metrics.json`, rebuilt from what the
run directory holds (config, metrics.jsonl, provenance.json, samples, the sites' evaluation arrays).
Self-contained: every figure is an embedded PNG, so the files open offline and can be mailed around.

This module gathers the numbers and draws the charts; the markup is in ``templates/`` (Jinja2):
``base.html`` (the page, its site-colour key and provenance footer), ``macros.html`` (tables),
``index.html``, ``site.html``, ``compare.html``, ``report.css``. One site has one colour on every
chart of every page (:func:`site_colours`); every number is shown with the n behind it where the
records carry it (:func:`n_behind`); ``metrics.json`` is strict JSON (NaN as null)."""

from __future__ import annotations

import base64
import io
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import jinja2
import matplotlib
from markupsafe import Markup

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from medgen import provenance, strictjson  # noqa: E402
from medgen.client import sent_log  # noqa: E402
from medgen.evaluation.plan import THRESHOLD_SOURCES  # noqa: E402
from medgen.server.rundir import RunDir, final_metrics  # noqa: E402

HEADLINE = ["loss", "radfd-healthy", "radfd-lesion", "kid-healthy", "kid-lesion", "precision-healthy", "recall-healthy",
            "ms-ssim-healthy", "ms-ssim-real-healthy", "ms-ssim-lesion", "ms-ssim-real-lesion", "fid-healthy",
            "fid-lesion", "pixel-auroc", "pixel-auprc", "dice-at-threshold", "best-dice-upper-bound", "slice-auroc",
            "epsilon", "memorisation-fraction", "memorisation-baseline", "mia-auc"]
DETECTION = ["pixel-auroc", "pixel-auprc", "dice-at-threshold", "best-dice-upper-bound", "slice-auroc"]
AUDIT = ["memorisation-fraction", "memorisation-baseline", "memorisation-ratio-median", "memorisation-baseline-median",
         "nn-train-rms", "nn-heldout-rms", "memorisation-samples", "mia-auc"]
CLASSES = ("healthy", "lesion")
PIXEL_SCORES = ("pixel-auroc", "pixel-auprc", "dice-at-threshold", "best-dice-upper-bound", "prevalence",
                "all-brain-dice")
# a round's phases in the order they run (secure aggregation: keys, shares, the masked train, unmask)
PHASE_ORDER = {p: i for i, p in enumerate(("query", "secagg-keys", "secagg-shares", "train", "secagg-unmask",
                                           "evaluate"))}
SLICE_SCORES = ("slice-auroc", "brain-area-slice-auroc")
# metric: (its reference without a model, name of that reference)
_REFERENCES = {"pixel-auroc": (None, "chance: 0.5"), "pixel-auprc": ("reference-prevalence", "chance: prevalence"),
               "dice-at-threshold": ("reference-all-brain-dice", "whole brain called lesion"),
               # best Dice >= the all-brain Dice by construction (its lowest threshold calls every pixel
               # lesion): equal means no threshold does better than calling the whole brain lesion
               "best-dice-upper-bound": ("reference-all-brain-dice", "whole brain called lesion"),
               "slice-auroc": ("reference-brain-area-slice-auroc", "slice brain area"),
               "volume-dice-at-threshold": ("reference-volume-all-brain-dice", "whole brain called lesion"),
               "volume-pixel-auprc": ("reference-volume-prevalence", "chance: prevalence")}
# sites drawn in tab10 order (grey kept for the server's own data), then tab20's light shades
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
            "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"]
_FIXED = {"global": "#222222", "server": "#7f7f7f"}  # "server": central_evaluation.SERVER_SITE
_HATCHES = ["", "//", "..", "xx", "\\\\", "++", "oo", "--"]


# ----------------------------------------------------------------------------- cells and markup

@dataclass(frozen=True)
class Num:
    """A table cell: a number and what it stands on (e.g. "n=64 real, 64 gen.")."""
    value: object
    n: str | None = None


def _text(v) -> str:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(_text, v))
    if isinstance(v, dict):
        return ", ".join(f"{k}={_text(x)}" for k, x in v.items())
    return str(v)


def _td(v) -> Markup:
    """One ``<td>``: numbers to 4 significant digits (NaN: n/a), long text wrapped, n in small type."""
    if isinstance(v, Num):
        if not v.n:
            return _td(v.value)
        return Markup('<td>{}<span class="n"> {}</span></td>').format(_text(v.value), v.n)
    text = _text(v)
    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        return Markup("<td>{}</td>").format(text)
    return Markup('<td class="text">{}</td>' if len(text) > 24 else '<td class="s">{}</td>').format(text)


_ENV = jinja2.Environment(loader=jinja2.PackageLoader("medgen.evaluation", "templates"),
                          autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True,
                          undefined=jinja2.StrictUndefined)
_ENV.filters["td"] = _td
_ENV.filters["text"] = _text


def _render(template: str, **context) -> str:
    return _ENV.get_template(template).render(**context)


def _table(rows: list[list], header: list[str]) -> Markup:
    return _ENV.get_template("macros.html").module.table(rows, header)


def _png(fig) -> Markup:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Markup('<img src="data:image/png;base64,{}">').format(base64.b64encode(buf.getvalue()).decode())


def _file_png(path: Path, width: int = 640, pixelated: bool = True) -> Markup:
    style = f"width:{width}px" + (";image-rendering:pixelated" if pixelated else "")
    return Markup('<img style="{}" src="data:image/png;base64,{}">').format(
        style, base64.b64encode(path.read_bytes()).decode())


# ----------------------------------------------------------------------------- sites and colours

def site_order(sites) -> list[str]:
    """Site names once each, sorted naturally (site2 before site10)."""
    return sorted(dict.fromkeys(sites), key=lambda s: [int(t) if t.isdigit() else t.lower()
                                                     for t in re.split(r"(\d+)", str(s))])


def site_colours(sites) -> dict[str, str]:
    """One colour per site, the same on every chart and legend of every page: the sites sorted take
    the palette in order; "global" (the mean) is near-black and "server" (its own data) grey. Pages
    built from the same site list (a run's and a comparison of runs of that study) agree."""
    names = [s for s in site_order(sites) if s not in _FIXED]
    return {**{s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(names)}, **_FIXED}


def _legend_outside(fig, axes) -> None:
    """One legend for the figure, right of its last plot (never over a curve or bar)."""
    axes = list(np.ravel(axes))
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        axes[-1].legend(list(seen.values()), list(seen), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                        frameon=False, borderaxespad=0)


# ----------------------------------------------------------------------------- numbers

def _count(v) -> str:
    return f"{int(v):,}" if isinstance(v, (int, float)) and math.isfinite(v) else "?"


def n_behind(key: str, metrics: dict) -> str | None:
    """What the number ``metrics[key]`` stands on, from the record's count keys: for a distance
    ``<name>-<class>`` the ``n-real-<class>`` / ``n-generated-<class>`` images; for a pixel score
    (and its references) ``n-scored-pixels`` / ``n-scored-lesion-pixels``; for a slice score
    ``n-scored-slices`` / ``n-scored-lesion-slices``. None when the record has no count."""
    base = key.split("@", 1)[0]
    if base.startswith("n-"):
        return None
    base = base.removeprefix("reference-outlier-").removeprefix("reference-")
    for cls in CLASSES:
        if base.endswith(f"-{cls}"):
            real, fake = metrics.get(f"n-real-{cls}"), metrics.get(f"n-generated-{cls}")
            if real is None and fake is None:
                return None
            return f"n={_count(real)} real, {_count(fake)} gen."
    if base in PIXEL_SCORES and "n-scored-pixels" in metrics:
        return f"n={_count(metrics['n-scored-pixels'])} px ({_count(metrics.get('n-scored-lesion-pixels'))} lesion)"
    if base.startswith("volume-") and "volumes" in metrics:
        return f"n={_count(metrics['volumes'])} volumes"
    if base in SLICE_SCORES and "n-scored-slices" in metrics:
        return (f"n={_count(metrics['n-scored-slices'])} slices "
                f"({_count(metrics.get('n-scored-lesion-slices'))} lesion)")
    return None


def _num(metrics: dict, key: str, counts: dict | None = None):
    """``metrics[key]`` as a cell with its n ("" when absent); ``counts``: where the n keys are."""
    if key not in metrics:
        return ""
    return Num(metrics[key], n_behind(key, metrics if counts is None else counts))


def _summed_counts(final: dict[str, dict], sites: list[str]) -> dict:
    """The n keys of the "global" mean: each the sum over the sites evaluated in its round (the
    record itself holds their mean)."""
    mean = final.get("global", {})
    parts = [final[s] for s in sites if s in final and final[s].get("round") == mean.get("round")]
    keys = {k for m in parts for k in m if k.startswith("n-")}
    return {k: sum(m.get(k, 0) for m in parts) for k in keys}


def _verdicts(metrics: dict) -> list[dict]:
    """Each lesion metric of a site against its trivial and no-model (intensity outlier) references,
    computed at the site on the same pixels and slices (``anomaly.references``)."""
    if "reference-prevalence" not in metrics:
        return []
    out = []
    for key, (ref_key, ref_name) in _REFERENCES.items():
        if key not in metrics:
            continue
        trivial = 0.5 if ref_key is None else metrics.get(ref_key, float("nan"))
        outlier = metrics.get(f"reference-outlier-{key}", float("nan"))
        value = metrics[key]
        refs = ((ref_name, trivial), ("intensity outlier", outlier))
        missing = [name for name, ref in refs if np.isnan(ref)]
        not_beaten = [name for name, ref in refs if not np.isnan(ref) and not value > ref]
        if np.isnan(value):  # undefined, e.g. no threshold: it beats nothing, and the page says why
            text = "not computed (a Dice at a threshold needs one: see below)" if "threshold" in key else \
                "not computed"
        else:
            text = ("does NOT beat " + " nor ".join(not_beaten) if not_beaten else
                    "beats both" if not missing else "beats what was computed")
            text += (f" ({', '.join(missing)}: not computed, no healthy slices held apart to calibrate it: "
                     "see the threshold below)") if missing else ""
        out.append({"key": key, "value": value, "ref_name": ref_name, "trivial": trivial, "outlier": outlier,
                    "not_beaten": not_beaten, "missing": missing, "text": text})
    return out


def with_references(keys: list[str], columns: list[dict], counts: list[dict] | None = None) -> list[list]:
    """Rows of a table with one column per metrics record (a site, a run): each key's row, and
    right under every lesion metric its two references in the same columns — the trivial one
    (``reference-<...>``, or chance 0.5) and the intensity-outlier score (``reference-outlier-<key>``),
    so that no lesion metric stands alone. ``counts``: where each column's n keys are."""
    counts = counts or columns
    rows = []
    for key in keys:
        rows.append([key] + [_num(m, key, c) for m, c in zip(columns, counts)])
        if key not in _REFERENCES:
            continue
        ref_key, ref_name = _REFERENCES[key]
        rows.append([f"↳ {ref_key} ({ref_name})" if ref_key else f"↳ {ref_name}"] +
                    [("" if key not in m else 0.5 if ref_key is None else _num(m, ref_key, c) or float("nan"))
                     for m, c in zip(columns, counts)])
        outlier = f"reference-outlier-{key}"
        rows.append([f"↳ {outlier} (no model)"] +
                    [_num(m, outlier, c) or float("nan") if key in m else "" for m, c in zip(columns, counts)])
    return rows


def _reference_rows(metrics: dict) -> list[list]:
    return [[v["key"], _num(metrics, v["key"]), v["ref_name"], v["trivial"], v["outlier"], v["text"]]
            for v in _verdicts(metrics)]


def _grouped_warnings(final: dict[str, dict], sites: list[str]) -> list[tuple[list[str], str]]:
    """Each distinct warning of the sites' last evaluations once, with the sites it concerns."""
    by_text: dict[str, list[str]] = {}
    for site in sites:
        for text in final.get(site, {}).get("warnings", []):
            by_text.setdefault(text, []).append(site)
    return [(names, text) for text, names in by_text.items()]


def threshold_words(metrics: dict) -> str | None:
    """Where a site's Dice threshold came from, in words (``threshold-source``); None without one."""
    if "threshold-source" not in metrics:
        return None
    source = THRESHOLD_SOURCES.get(int(metrics["threshold-source"]), "unknown")
    value = metrics.get("threshold", float("nan"))
    n = metrics.get("n-calibration-slices")
    return (f"{value:.4g}, fixed on " if math.isfinite(value) else "none: ") + source + \
        (f" ({_count(n)} slices)" if n is not None else "")


UTILITY_ARMS = (("real", "trained on real slices"), ("synthetic", "trained on samples only"),
                ("real+synthetic", "trained on both"))


def utility_rows(metrics: dict) -> dict | None:
    """The site page's synthetic-data utility table (``evaluation.utility``, ``utility.site_metrics``):
    per arm its test AUROC and AUPRC, then the references on the same test slices (chance AUROC 0.5
    with AUPRC = the lesion prevalence, a slice's brain area as its score) and the gain of adding the
    samples; ``n`` in words. None when the site sent no ``utility-*`` number."""
    if not any(k.startswith("utility-") for k in metrics):
        return None
    nan = float("nan")
    rows = [[f"{arm} ({words})", metrics.get(f"utility-{arm}-auroc", nan), metrics.get(f"utility-{arm}-auprc", nan)]
            for arm, words in UTILITY_ARMS]
    rows += [["↳ chance (AUPRC: the lesion prevalence of the test slices)", 0.5,
              metrics.get("utility-reference-prevalence", nan)],
             ["↳ brain area alone as the slice score (no model)", metrics.get("utility-reference-brain-area-auroc", nan),
              "—"],
             ["gain: real+synthetic − real", metrics.get("utility-gain-auroc", nan), "—"]]
    n = [f"{_count(metrics[k])} {words}" for k, words in (("n-utility-train-slices", "training slices"),
                                                          ("n-utility-test-slices", "test slices"),
                                                          ("n-utility-test-subjects", "test subjects"),
                                                          ("n-utility-seeds", "seeds (means over them)"))
         if k in metrics]
    return {"rows": rows, "n": ", ".join(n)}


def outlier_blind_side(metrics: dict) -> str | None:
    """The note when the intensity-outlier reference cannot call one side at this site: the most
    |intensity - median| reaches there (``reference-outlier-bright-reach`` / ``-dark-reach``, on the
    scored brain pixels, before the median filter, which cannot raise it) is not above its
    threshold, so no pixel brighter (darker) than the median is ever called lesion. For the two-sided
    score (``reference-outlier-bright-threshold`` present) the reach is in its units (the deviation
    over that side's healthy quantile, threshold 1): blind only when the side's healthy quantile is
    itself at the clip. None otherwise."""
    threshold = metrics.get("reference-outlier-threshold", float("nan"))
    if not math.isfinite(threshold):
        return None
    blind = [(side, metrics[f"reference-outlier-{key}-reach"]) for side, key in (("brighter", "bright"),
                                                                                 ("darker", "dark"))
             if metrics.get(f"reference-outlier-{key}-reach", math.inf) <= threshold]
    if not blind:
        return None
    if "reference-outlier-bright-threshold" in metrics:  # the two-sided score (since 2026-12-03)
        return (f"The intensity-outlier reference calls no pixel {' nor '.join(side for side, _ in blind)} than "
                f"the healthy median here: its deviation over that side's healthy quantile reaches at most "
                f"{', '.join(f'{reach:.3g}' for _, reach in blind)} (intensities are clipped into [0, 1]), not above "
                f"its threshold {threshold:.4g}: as many healthy pixels lie that far out. Its Dice at the threshold "
                "counts the other side only; its AUROC, AUPRC and best Dice do not depend on the threshold.")
    return (f"The intensity-outlier reference calls no pixel {' nor '.join(side for side, _ in blind)} than the "
            f"healthy median here: |intensity - median| reaches at most "
            f"{', '.join(f'{reach:.3g}' for _, reach in blind)} on that side (intensities are clipped into [0, 1]), "
            f"not above its threshold {threshold:.4g}. Its Dice at the threshold counts the other side only; its "
            "AUROC, AUPRC and best Dice do not depend on the threshold.")


def verdict(metrics: dict) -> tuple[bool, str] | None:
    """The index page's flag for one site: (every lesion metric beats its references, in words);
    None for a site without lesion scores."""
    found = _verdicts(metrics)
    if not found:
        return None
    bad = [f"{v['key']} (not computed)" if np.isnan(v["value"]) else f"{v['key']} ({' nor '.join(v['not_beaten'])})"
           for v in found if v["not_beaten"] or np.isnan(v["value"])]
    missing = sorted({m for v in found for m in v["missing"]})
    text = ("does NOT beat its reference: " + "; ".join(bad) if bad else
            f"all {len(found)} lesion metrics beat their references")
    return not bad, text + (f" ({', '.join(missing)}: not computed)" if missing else "")


def lesion_words(final: dict[str, dict]) -> dict[str, dict]:
    """For metrics.json, what the pages say of each site's lesion scores: whether they all beat their
    references (and which do not), and where the Dice threshold came from; sites only (the pages
    judge no mean over sites)."""
    out = {}
    for site, metrics in final.items():
        found = verdict(metrics) if site != "global" else None
        if found is not None:
            out[site] = {"beats-references": found[0], "verdict": found[1], "threshold": threshold_words(metrics),
                         "outlier-note": outlier_blind_side(metrics)}
    return out


def privacy_spent(records: list[dict]) -> dict[str, dict]:
    """The last privacy numbers of every site (DP-SGD's sample-level epsilon) and of "global" (central
    DP's site-level epsilon): {site: {"round": r, "epsilon" | "central-epsilon": e, ...}}."""
    out: dict[str, dict] = {}
    for r in records:
        if r["phase"] == "train" and ("epsilon" in r or "central-epsilon" in r):
            out[r["site"]] = {k: v for k, v in r.items() if k == "round" or "epsilon" in k or "delta" in k}
    return out


def status_words(status: dict, rounds: int) -> str:
    """status.json in a sentence."""
    state, done = status.get("status"), status.get("round")
    if state == "completed":
        if "evaluated" in status:
            text = f"completed: the checkpoint of round {done} evaluated on {status['evaluated']}"
        else:
            text = f"completed: {done if done is not None else '?'} of {rounds} rounds"
        text += f"; stopped early: {status['stopped']}" if status.get("stopped") else ""
    elif state == "running":
        text = (f"running, or stopped without a word (a killed process): {done or 0} of {rounds} rounds done "
                "so far")
    elif state == "failed":
        text = f"FAILED after {done or 0} of {rounds} rounds: {status.get('error', 'no error recorded')}"
    elif state == "missing":
        text = "unknown: the run directory has no status.json (it never started, or it is incomplete)"
    else:
        text = f"{state}: round {done}"
    if status.get("skipped-files"):
        text += "; bad files skipped: " + ", ".join(f"site {s}: {n}" for s, n in status["skipped-files"].items())
    return text


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {s:02d} s" if minutes else f"{s} s"


def budget(cfg: dict, records: list[dict]) -> dict:
    """What a run spent: rounds done (of configured), optimiser steps per site per round (measured;
    configured), total site steps, wall time from the first to the last record, and the sum of the
    rounds' own times."""
    train = [r for r in records if r["phase"] == "train" and r["site"] != "global" and "steps" in r]
    rounds = [r["round"] for r in records if r["phase"] == "train" and r["site"] == "global"]
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    t = cfg.get("train", {})
    configured = (f"{t['local_steps']} steps" if t.get("local_steps") else
                  f"{t.get('local_epochs')} local epochs" if t.get("local_epochs") else "?")
    steps = [r["steps"] for r in train]
    done = max(rounds, default=max((r["round"] for r in train), default=0))
    return {"rounds": f"{done} of {cfg.get('federation', {}).get('rounds', '?')}" if done else "no training in this run",
            "steps per site per round": (f"{statistics.median(steps):g} ({configured} configured)" if steps
                                         else f"({configured} configured)"),
            "site steps in all": int(sum(steps)),
            "wall time": _duration(max(times) - min(times)) if len(times) > 1 else "n/a",
            "rounds' own time": _duration(sum(r.get("round-time-s", 0.0) for r in records
                                              if r["phase"] == "train" and r["site"] == "global"))}


# ----------------------------------------------------------------------------- charts

def _reference_series(record: dict, key: str) -> list[tuple[str, object]]:
    """The references of lesion metric ``key`` in one record: [(label, value)] for the trivial one
    and the intensity-outlier score (NaN where not computed); [] for a key without references."""
    if key not in _REFERENCES:
        return []
    ref_key, _ = _REFERENCES[key]
    return [(f"↳ {ref_key or 'chance'}", 0.5 if ref_key is None else record.get(ref_key, float("nan"))),
            ("↳ intensity outlier", record.get(f"reference-outlier-{key}", float("nan")))]


def reference_header(keys: list[str]) -> list[str]:
    """Column names of a table with one row per record: each key, and right after each lesion
    metric its two references ("↳ chance" or "↳ reference-<...>", then "↳ intensity outlier")."""
    return [h for k in keys for h in (k, *(label for label, _ in _reference_series({}, k)))]


def reference_cells(record: dict, key: str) -> list:
    """The cells under :func:`reference_header` for one key of one record: its value with its n,
    then its references on the same pixels and slices (NaN, shown n/a, where not computed); all
    empty where the record lacks the key."""
    refs = _reference_series(record, key)
    if key not in record:
        return [""] * (1 + len(refs))
    return [Num(record[key], n_behind(key, record)), *(v for _, v in refs)]


def _curves(records: list[dict], sites: list[str], phase: str, keys: list[str], title: str,
            colours: dict[str, str]) -> Markup:
    """One panel per key, one line with markers per site; the keys with at most one finite value
    per site (one round, a full evaluation at the last round only, a score never computed) as a
    table of each site's last value instead (a lone dot is no curve, an empty panel says nothing).
    A lesion metric has its references beside it: dotted (trivial) and dashed (intensity outlier)
    in the site's colour on a chart, the next columns in a table."""
    mine = [r for r in records if r["phase"] == phase and r["site"] in sites]
    keys = [k for k in keys if any(k in r for r in mine)]
    series = {(k, s): [(r["round"], r[k], r) for r in mine if r["site"] == s and k in r] for k in keys for s in sites}
    def finite(pts):
        return sum(isinstance(p[1], (int, float)) and math.isfinite(p[1]) for p in pts)

    drawn = [k for k in keys if any(finite(series[k, s]) > 1 for s in sites)]
    single = [k for k in keys if k not in drawn]
    out = Markup("")
    if drawn:
        fig, axes = plt.subplots(1, len(drawn), figsize=(3.4 * len(drawn), 2.8), squeeze=False)
        for ax, key in zip(axes[0], drawn):
            for site in sites:
                if pts := series[key, site]:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=colours[site],
                            label=site)
                    refs = [_reference_series(p[2], key) for p in pts]
                    for j, style in enumerate((":", "--")[:len(refs[0])]):
                        ax.plot([p[0] for p in pts], [r[j][1] for r in refs], linestyle=style, linewidth=1,
                                color=colours[site])
            if key in _REFERENCES:  # legend entries in grey: the lines take their site's colour
                ax.plot([], [], ":", color="grey", label="trivial reference (site's colour)")
                ax.plot([], [], "--", color="grey", label="intensity outlier, no model (site's colour)")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("round")
            ax.xaxis.get_major_locator().set_params(integer=True)
        _legend_outside(fig, axes)
        fig.suptitle(title, fontsize=10, y=1.04)
        out += _png(fig)
    if single:
        rows, header = [], ["site", "round", *reference_header(single)]
        for site in sites:
            found = {k: series[k, site][-1] for k in single if series[k, site]}  # (round, value, record)
            if found:
                rows.append([site, next(iter(found.values()))[0]] +
                            [c for k in single for c in reference_cells(found[k][2] if k in found else {}, k)])
        out += Markup('<p class="note">{}: {}</p>').format(
            title, "one value per site, so a table rather than a chart" if not drawn else
            "the last value of the keys with at most one value per site, as a table")
        out += _table(rows, header)
    return out


def _roc_pr(arrays: dict[str, dict], colours: dict[str, str]) -> Markup:
    sites = [s for s in site_order(arrays) if "roc-fpr" in arrays[s] and len(arrays[s]["roc-fpr"])]
    if not sites:
        return Markup("")
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(8, 3.4))
    for site in sites:
        a = arrays[site]
        roc.plot(a["roc-fpr"], a["roc-tpr"], color=colours[site], label=site)
        pr.plot(a["pr-recall"], a["pr-precision"], color=colours[site], label=site)
    roc.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="pixel ROC")
    pr.set(xlabel="recall", ylabel="precision", title="pixel precision-recall")
    _legend_outside(fig, [roc, pr])
    return _png(fig)


def _by_setting(metrics: dict, a: dict) -> dict | None:
    """Lesion detection per anomaly-map setting (keys such as ``pixel-auroc@t=800``: the family's
    ``anomaly_sweep``, the configured setting first) as table rows, with their ROC curves."""
    settings = list(dict.fromkeys(k.split("@", 1)[1] for k in metrics if "@" in k))
    if len(settings) < 2:
        return None
    rows = [[s] + [_num(metrics, f"{k}@{s}") for k in DETECTION] for s in settings]
    # the references do not depend on the setting (same pixels, slices and no-model score)
    rows.append(["trivial reference"] + [0.5 if _REFERENCES[k][0] is None else _num(metrics, _REFERENCES[k][0])
                                         for k in DETECTION])
    rows.append(["intensity outlier (no model)"] + [_num(metrics, f"reference-outlier-{k}") for k in DETECTION])
    chart = Markup("")
    if all(f"roc-fpr@{s}" in a for s in settings):
        fig, ax = plt.subplots(figsize=(4.4, 3.4))
        for s in settings:
            ax.plot(a[f"roc-fpr@{s}"], a[f"roc-tpr@{s}"], label=s)
        ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="pixel ROC by setting")
        _legend_outside(fig, [ax])
        chart = _png(fig)
    return {"rows": rows, "header": ["setting", *DETECTION], "chart": chart}


def _overlays(a: dict) -> Markup | None:
    if "overlay-images" not in a:
        return None
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


def _privacy(records: list[dict], site: str, metrics: dict, a: dict, colours: dict[str, str]) -> dict:
    """A site's "Privacy and memorisation" section: epsilon over rounds, the audit's numbers, the
    distribution of d_train / d_heldout against the baseline, and the closest pairs."""
    out = {"epsilon": _curves(records, [site, "global"], "train", ["epsilon", "central-epsilon"],
                              f"site {site}: privacy spent", colours), "audit": None}
    if "memorisation-fraction" not in metrics:
        return out
    out["audit"] = [[k, metrics[k]] for k in AUDIT if k in metrics]
    out["threshold"] = threshold = float(a["memorisation-threshold"][0]) if "memorisation-threshold" in a \
        else float("nan")
    out["ratios"] = out["pairs_chart"] = out["pairs"] = None
    if "memorisation-ratios" in a:
        fig, ax = plt.subplots(figsize=(6, 2.6))
        bins = np.linspace(0, max(1.5, float(np.max(a["memorisation-ratios"], initial=0))), 40)
        ax.hist(a["memorisation-ratios"], bins, alpha=0.6, density=True, label="generated")
        if len(a.get("memorisation-baseline-ratios", [])):
            ax.hist(a["memorisation-baseline-ratios"], bins, alpha=0.6, density=True, label="baseline (real, unseen)")
        ax.axvline(threshold, color="red", linestyle=":", label="threshold")
        ax.set(xlabel="d_train / d_heldout", title="nearest-neighbour distance ratio")
        _legend_outside(fig, [ax])
        out["ratios"] = _png(fig)
    if "memorisation-generated" not in a:
        out["pairs"] = [[i + 1, float(t), float(h)] for i, (t, h) in
                        enumerate(zip(a.get("memorisation-pair-d-train", []), a.get("memorisation-pair-d-heldout", [])))]
        return out
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
    out["pairs_chart"] = _png(fig)
    return out


def _histograms(records: list[dict], sites: list[str], colours: dict[str, str]) -> Markup:
    hists = {r["site"]: r["intensity-hist"] for r in records if r["phase"] == "query" and "intensity-hist" in r}
    if not hists:
        return Markup("")
    fig, ax = plt.subplots(figsize=(6, 2.8))
    for site in sites:
        if site in hists:
            h = np.asarray(hists[site], dtype=float)
            ax.plot(np.linspace(0, 1, len(h)), h, color=colours[site], label=site)
    ax.set(xlabel="normalised brain intensity", ylabel="share of brain pixels", title="intensity histograms")
    _legend_outside(fig, [ax])
    return _png(fig)


def _central(records: list[dict], colours: dict[str, str]) -> dict | None:
    last = privacy_spent(records).get("global")
    if not last or "central-epsilon" not in last:
        return None
    distributed = any(r.get("central-distributed") for r in records if r["site"] == "global" and r["phase"] == "train")
    return {**last, "distributed": distributed,
            "chart": _curves(records, ["global"], "train", ["central-epsilon", "central-clipping-norm",
                                                                    "central-noise-norm", "central-mean-norm"],
                                     "central DP, per round", colours)}


def _sent(run: RunDir, records: list[dict], site: str) -> dict:
    """A site's "What left the site" section: its refusals, and its own sent-message log where the
    run holds it (a simulation; a deployed site keeps it in its state folder)."""
    entries = sent_log.read(run.path / "sites" / site)
    return {"refused": [[r["round"], r["phase"], r["refused"]] for r in records if r["site"] == site and "refused" in r],
            "summary": sent_log.summary(entries), "messages": len(entries), "file": sent_log.FILE}


def _site_picture(run, site: str) -> str:
    """A site's "Data" section: the picture of its slices (medgen.data.picture) drawn by the site
    into its state folder, where the run holds that folder (a simulation, `medgen evaluate`)."""
    path = Path(run.path) / "sites" / site / "overview.png"
    return _render("data.html", picture=_file_png(path, width=900, pixelated=False) if path.is_file() else None)


# ----------------------------------------------------------------------------- provenance

_PROVENANCE_ROWS = [("started", "started"), ("medgen", "medgen"), ("git commit", "git"), ("python", "python"),
                    ("platform", "platform"), ("device", "device"), ("config sha256", "config-sha256")]


def _provenance_cell(entry: dict, key: str) -> str:
    if not entry:
        return "not recorded"
    value = entry.get(key)
    if key == "git":
        return "not a git checkout" if not value else value["commit"][:12] + (" (modified)" if value.get("dirty") else "")
    if key == "config-sha256":
        return value[:16] if value else "n/a"
    return "not recorded" if value is None else str(value)


def _provenance_table(columns: list[tuple[str, dict]]) -> dict:
    libraries = list(dict.fromkeys(k for _, e in columns for k in e.get("libraries", {})))
    rows = [[label] + [_provenance_cell(e, key) for _, e in columns] for label, key in _PROVENANCE_ROWS]
    rows += [[lib] + [e["libraries"].get(lib) or "not installed" if e else "not recorded" for _, e in columns]
             for lib in libraries]
    return {"header": ["", *[name for name, _ in columns]], "rows": rows}


def _provenance(run: RunDir, builder: dict) -> dict:
    """The footer: who wrote the run (each session in provenance.json) and who built this report."""
    sessions = provenance.read(run.path)
    columns = [(f"run, session {i + 1}" if len(sessions) > 1 else "run written by", s) for i, s in enumerate(sessions)]
    current = builder.get("config-sha256")
    return {"table": _provenance_table([*columns, ("this report built by", builder)]),
            "recorded": bool(sessions),
            "config_changed": bool(sessions) and sessions[-1].get("config-sha256") not in (None, current),
            "compare": False}


# ----------------------------------------------------------------------------- pages

def _config_rows(cfg: dict, status: dict) -> list[list]:
    privacy = cfg["privacy"]
    return [["model", cfg["model"]["family"]], ["strategy", cfg["federation"]["strategy"]],
            ["rounds", cfg["federation"]["rounds"]], ["training sites", site_order(cfg["sites"]["train"])],
            ["held-out sites", site_order(cfg["sites"]["heldout"])], ["data", cfg["data"]["root"] or "phantom cohort"],
            ["image size", cfg["data"]["image_size"]],
            ["privacy", {k: v for k, v in privacy.items() if v is not None} if privacy["enabled"] else "off"],
            ["status", status_words(status, cfg["federation"]["rounds"])]]


def build_report(run_dir: str | Path) -> Path:
    """Write the run's report; returns ``<run>/report/index.html``."""
    run = RunDir(run_dir)
    cfg = yaml.safe_load((run.path / "config.yaml").read_text())
    records, status = run.records(), run.status()
    seen = [r["site"] for r in records if r["site"] != "global"]
    heldout = cfg["sites"]["heldout"]
    configured = cfg["sites"]["train"] + heldout
    sites = site_order([s for s in configured if s in seen] + seen)  # + e.g. a folder scored by `medgen evaluate`
    colours = site_colours(configured + sites)
    evaluations = sorted((run.path / "evaluation").glob("round-*"))
    arrays = {p.stem: dict(np.load(p)) for p in evaluations[-1].glob("*.npz")} if evaluations else {}
    final = final_metrics(records)
    spent = budget(cfg, records)
    builder = provenance.collect(run.path / "config.yaml")
    out = run.path / "report"
    out.mkdir(exist_ok=True)
    (out / "metrics.json").write_text(strictjson.dumps(
        {"status": status, "status-words": status_words(status, cfg["federation"]["rounds"]), "final": final,
         "privacy": privacy_spent(records), "budget": spent, "lesion-detection": lesion_words(final),
         "provenance": {"run": provenance.read(run.path), "report": builder}}, indent=1))

    shown = [k for k in HEADLINE if any(k in m for m in final.values())]
    columns = [s for s in sites + ["global"] if s in final]
    counts = {s: _summed_counts(final, sites) if s == "global" else final[s] for s in columns}
    metric_rows = [["round"] + [final[s].get("round", "") for s in columns]]
    metric_rows += with_references(shown, [final[s] for s in columns], [counts[s] for s in columns])
    query = sorted((r for r in records if r["phase"] == "query"), key=lambda r: sites.index(r["site"])
                   if r["site"] in sites else len(sites))
    data_rows = [[r["site"], r.get("train-examples", ""), r.get("eval-examples", ""), r.get("lesion-slices", ""),
                  r.get("subjects", ""), r.get("skipped-files", ""), r.get("voxel-sizes", ""), r.get("orientations", ""),
                  r.get("error", r.get("refused", "")), r.get("policy", "none (simulated)")] for r in query]
    samples = sorted(run.samples.glob("round-*.png"))
    common = {"colours": {s: colours[s] for s in sites + ["global"] if s in colours},
              "provenance": _provenance(run, builder)}
    verdicts = [(s, verdict(final[s]), threshold_words(final[s])) for s in sites if s in final]
    classes = final.get("global", {}).get("trained-classes", list(CLASSES))
    index = _render(
        "index.html", title=f"medgen report — {run.path.name}", **common,
        config_rows=_config_rows(cfg, status), budget_rows=[[k, v] for k, v in spent.items()], data_rows=data_rows,
        histograms=_histograms(records, sites, colours),
        training=_curves(records, sites, "train", ["loss", "epsilon"], "training, per site", colours),
        central=_central(records, colours),
        evaluation=_curves(records, sites, "evaluate", ["loss", "radfd-healthy", "pixel-auroc", "dice-at-threshold"],
                           "evaluation (training sites: validation subjects; held-out sites: all)", colours),
        metric_header=["metric"] + [f"{s} (held out)" if s in heldout else s for s in columns], metric_rows=metric_rows,
        fid_missing=not any(k.startswith("fid-") for m in final.values() for k in m),
        samples=_file_png(samples[-1]) if samples else None, roc=_roc_pr(arrays, colours),
        verdicts=[(s, v, t) for s, v, t in verdicts if v is not None], sites=sites, sample_classes=classes,
        warnings=_grouped_warnings(final, sites))
    (out / "index.html").write_text(index)
    record_keys = ["loss", *shown[1:]]
    for site in sites:
        # every train / evaluate record, and the failures of the other phases (query, the secure
        # aggregation steps secagg-keys / -shares / -unmask), in the order of a round
        mine = [r for r in records if r["site"] == site and (r["phase"] in ("train", "evaluate")
                                                            or "error" in r or "refused" in r)]
        # each lesion metric with its references in the next columns, as in the evaluation tables
        rows = [[r["round"], r["phase"]] + [c for k in record_keys for c in reference_cells(r, k)] +
                [r.get("error", r.get("refused", ""))]
                for r in sorted(mine, key=lambda r: (r["round"], PHASE_ORDER.get(r["phase"], len(PHASE_ORDER))))]
        metrics, a = final.get(site, {}), arrays.get(site, {})
        page = _render(
            "site.html", title=f"medgen report — site {site}", **common, site=site, heldout=site in heldout,
            picture=Markup(_site_picture(run, site)), record_header=["round", "phase", *reference_header(record_keys), "error"],
            record_rows=rows,
            training=_curves(records, [site], "train", ["loss", "epsilon"], f"site {site}: training", colours),
            evaluation=_curves(records, [site], "evaluate", ["loss", "pixel-auroc"], f"site {site}: evaluation",
                               colours),
            roc=_roc_pr({site: a} if a else {}, colours), references=_reference_rows(metrics),
            outlier_note=outlier_blind_side(metrics), utility=utility_rows(metrics),
            threshold=threshold_words(metrics), warnings=metrics.get("warnings", []),
            by_setting=_by_setting(metrics, a), overlays=_overlays(a), lesion_scored="roc-fpr" in a or
            "pixel-auroc" in metrics, privacy=_privacy(records, site, metrics, a, colours),
            sent=_sent(run, records, site))
        (out / f"site-{site}.html").write_text(page)
    return out / "index.html"


# ----------------------------------------------------------------------------- comparison

_LESION_CHART = ["pixel-auroc", "pixel-auprc", "dice-at-threshold", "slice-auroc"]


def _compare_chart(runs: list[tuple[str, str, dict]], plotted: list[str], colours: dict[str, str]) -> Markup:
    """Bars per (run, held-out site): the site's colour, one hatch per run; the trivial reference
    (black) and the intensity-outlier score (grey, dashed) as ticks over each bar; legend outside."""
    names = list(dict.fromkeys(name for name, _, _ in runs))
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    width = 0.8 / len(runs)
    for i, (name, site, m) in enumerate(runs):
        x = np.arange(len(plotted)) + i * width
        ax.bar(x, [m.get(k, np.nan) for k in plotted], width, color=colours[site],
               hatch=_HATCHES[names.index(name) % len(_HATCHES)], edgecolor="white", label=f"{name} / {site}")
        for xi, key in zip(x, plotted):
            ref_key = _REFERENCES[key][0]
            trivial = 0.5 if ref_key is None else m.get(ref_key, np.nan)
            ax.hlines(trivial, xi - width / 2, xi + width / 2, colors="black", linewidth=1.5,
                      label="trivial reference")
            ax.hlines(m.get(f"reference-outlier-{key}", np.nan), xi - width / 2, xi + width / 2, colors="grey",
                      linestyles="dashed", linewidth=1.2, label="intensity outlier (no model)")
    ax.set_xticks(np.arange(len(plotted)) + 0.4 - width / 2, plotted)
    ax.set_title("held-out sites: lesion detection")
    _legend_outside(fig, [ax])
    return _png(fig)


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One table and one chart of the held-out sites' final metrics of several runs (e.g.
    federated vs `medgen train --site` vs `--centralized`), with each run's budget and provenance."""
    runs, budgets, columns, all_sites = [], [], [], []
    builder = provenance.collect()
    for d in run_dirs:
        run = RunDir(d)
        cfg = yaml.safe_load((run.path / "config.yaml").read_text())
        records = run.records()
        final = final_metrics(records)
        all_sites += cfg["sites"]["train"] + cfg["sites"]["heldout"] + [r["site"] for r in records]
        for site in site_order(cfg["sites"]["heldout"]):
            if site in final:
                runs.append((run.path.name, site, final[site]))
        spent = budget(cfg, records)
        budgets.append([run.path.name, status_words(run.status(), cfg["federation"]["rounds"]), cfg["model"]["family"],
                        cfg["federation"]["strategy"], *spent.values()])
        sessions = provenance.read(run.path)
        columns.append((run.path.name, sessions[-1] if sessions else {}))
    colours = site_colours([s for s in all_sites if s != "global"])
    keys = [k for k in HEADLINE if any(k in m for _, _, m in runs)]
    rows = with_references(keys, [m for _, _, m in runs])  # each lesion metric with its references under it
    flags = [verdict(m) for _, _, m in runs]
    if any(flags):
        rows.append(["lesion metrics vs their references"] +
                    [("✓ " if f[0] else "✗ ") + f[1] if f else "" for f in flags])
        rows.append(["Dice threshold fixed on"] + [threshold_words(m) or "" for _, _, m in runs])
    plotted = [k for k in _LESION_CHART if k in keys]
    shown_sites = site_order(s for _, s, _ in runs)
    page = _render("compare.html", title="medgen comparison", colours={s: colours[s] for s in shown_sites},
                   provenance={"table": _provenance_table([*columns, ("this page built by", builder)]),
                               "recorded": all(e for _, e in columns), "config_changed": False,
                               "compare": True},
                   header=["metric", *[f"{name} / {site}" for name, site, _ in runs]], rows=rows,
                   chart=_compare_chart(runs, plotted, colours) if plotted and runs else None,
                   budget_header=["run", "status", "model", "strategy", *budget({}, []).keys()], budget_rows=budgets)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.html").write_text(page)
    (out / "compare.json").write_text(strictjson.dumps([{"run": n, "site": s, **m} for n, s, m in runs], indent=1))
    return out / "compare.html"
