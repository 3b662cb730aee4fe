"""What left the site: one JSON line per message the site sent, appended to
``<state-dir>/sent-messages.jsonl`` before the message goes.

Each line says when, for which run and round, what kind of message (query / train / evaluate),
whether it was a reply, a refusal or an error (with the reason sent), and per record of the reply its kind, key names and
size in bytes — for arrays their shapes, with the image-shaped ones (two trailing dimensions of
the slice size) listed apart. Values are not copied: the log shows what left, not a second copy.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from medgen import strictjson

FILE = "sent-messages.jsonl"


def _record(rec, image_size: int) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord  # only a sending site needs Flower here

    if isinstance(rec, ArrayRecord):
        shapes = {k: list(a.shape) for k, a in rec.items()}
        images = [k for k, s in shapes.items() if len(s) >= 2 and s[-2:] == [image_size, image_size]]
        return {"type": "arrays", "keys": sorted(shapes), "bytes": sum(len(a.data) for a in rec.values()),
                "shapes": shapes, "image-shaped": sorted(images)}
    if isinstance(rec, MetricRecord):
        count = sum(len(v) if isinstance(v, list) else 1 for v in rec.values())
        return {"type": "metrics", "keys": sorted(rec), "bytes": 8 * count}
    if isinstance(rec, ConfigRecord):
        return {"type": "config", "keys": sorted(rec), "bytes": sum(len(str(v).encode()) for v in rec.values())}
    return {"type": type(rec).__name__, "keys": []}


def describe(content, image_size: int) -> dict[str, dict]:
    """Per record of ``content`` (a Flower RecordDict): its kind, key names, bytes (and array shapes)."""
    return {name: _record(rec, image_size) for name, rec in content.items()}


def append(state_dir: Path, entry: dict) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / FILE).open("a") as f:
        f.write(strictjson.dumps({"time": round(time.time(), 3), **entry}) + "\n")


def read(state_dir: Path) -> list[dict]:
    """The log's entries (a torn last line is left out)."""
    path = Path(state_dir) / FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def summary(entries: list[dict]) -> list[list]:
    """Rows (kind, status, messages, bytes, records and keys, image-shaped arrays) for a report."""
    rows: dict[tuple[str, str], dict] = {}
    for e in entries:
        row = rows.setdefault((e["kind"], e["status"]), {"n": 0, "bytes": 0, "keys": set(), "images": set()})
        row["n"] += 1
        for name, rec in e.get("records", {}).items():
            row["bytes"] += rec.get("bytes", 0)
            if rec.get("type") == "arrays":
                row["keys"].add(f"{name}: {len(rec.get('keys', []))} arrays")
            else:
                row["keys"].update(f"{name}.{k}" for k in rec.get("keys", []))
            row["images"].update(f"{name}.{k}" for k in rec.get("image-shaped", []))
    return [[kind, status, r["n"], r["bytes"], ", ".join(sorted(r["keys"])) or "-", ", ".join(sorted(r["images"])) or "none"]
            for (kind, status), r in sorted(rows.items())]


_PATH = re.compile(r"(?<![\w.<])(?:~|\.{1,2})?/[^\s:'\",()\]\[]+")
_FILE = re.compile(r"(?i)\b[\w.+-]+\.(?:nii(?:\.gz)?|gz|csv|ya?ml|json|npz|pt|txt|key|pem)\b")


def redact(text: str) -> str:
    """``text`` without file paths or file names (they may carry subject identifiers): what a site
    sends in an error; its own log keeps the full text."""
    return _FILE.sub("<file>", _PATH.sub("<path>", text))
