"""Weights in one piece on the wire. Flower moves every tensor of a message as its own object
(one HTTPS request each, per hop: ServerApp -> SuperLink -> SuperNode -> ClientApp and back), so
a 60-tensor model costs ~120 requests per message. Between medgen's server and medgen's site
worker every ArrayRecord travels instead as one byte array plus its layout (names, dtypes,
shapes) in a ConfigRecord, and is unpacked on arrival into the identical ArrayRecord.

Only between parties that both speak it: the site worker says so in its query reply
(``TRANSPORT`` record); a site running Flower's own ClientApp processes gets ordinary messages.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

LAYOUT = "medgen-packed-layout"  # ConfigRecord: for each packed ArrayRecord, its layout as JSON
TRANSPORT = "medgen-transport"  # ConfigRecord a site worker adds to its query reply: {"packing": 1}
PACKED = "packed"


def pack(content: RecordDict) -> bool:
    """Replace every ArrayRecord of ``content`` by one uint8 array; False if there was none."""
    records = dict(content.array_records)
    if not records or LAYOUT in content:
        return False
    layouts = {}
    for name, record in records.items():
        arrays = [(key, np.asarray(array.numpy(), order="C")) for key, array in record.items()]  # 0-d stays 0-d
        layouts[name] = json.dumps([[key, a.dtype.str, list(a.shape)] for key, a in arrays])
        blob = b"".join(a.tobytes() for _, a in arrays)
        content[name] = ArrayRecord({PACKED: Array(np.frombuffer(blob, dtype=np.uint8))})
    content[LAYOUT] = ConfigRecord(layouts)
    return True


def unpack(content: RecordDict) -> bool:
    """Undo ``pack`` in place; False if ``content`` was not packed."""
    if LAYOUT not in content:
        return False
    for name, layout in content[LAYOUT].items():
        blob = content[name][PACKED].numpy().tobytes()
        arrays, offset = {}, 0
        for key, dtype, shape in json.loads(str(layout)):
            dt = np.dtype(dtype)
            size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            arrays[key] = Array(np.frombuffer(blob, dtype=dt, count=size // dt.itemsize if dt.itemsize else 0,
                                              offset=offset).reshape(shape).copy())
            offset += size
        if offset != len(blob):
            raise ValueError(f"packed ArrayRecord {name!r}: layout covers {offset} bytes of {len(blob)}")
        content[name] = ArrayRecord(arrays)
    del content[LAYOUT]
    return True
