"""The Ray setting medgen changes beyond ``ray.init``'s arguments: a local Ray that listens on
loopback only. Written against ray 2.55 (the version flwr 1.41 pins)."""

from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"


def ray_loopback() -> dict:
    """The ``ray.init`` arguments (Flower's backend ``init_args``) that keep a local Ray on
    127.0.0.1. Ray 2.55 turns ``_node_ip_address="127.0.0.1"`` into the machine's outward address
    unless it runs as a single-machine node (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when
    ``ray`` is imported, so it is also set on the loaded module); its GCS, raylet and workers then
    listen on 127.0.0.1 instead of every interface (measured with ``ss -ltnp``)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # also for Ray's own child processes
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
    return {"_node_ip_address": LOOPBACK}
