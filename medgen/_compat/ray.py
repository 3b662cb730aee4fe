"""The Ray settings medgen changes beyond ``ray.init``'s documented arguments: a local Ray of its
own that listens on loopback only, and a Ray cluster on this machine's loopback that a driver can
reach. Written against ray 2.55 (the version flwr 1.41 pins)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0


def ray_loopback() -> dict:
    """The ``ray.init`` arguments that keep a Ray node on 127.0.0.1. Ray 2.55 turns
    ``_node_ip_address="127.0.0.1"`` into the machine's outward address unless it runs as a
    single-machine node (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ``ray`` is imported, so
    it is also set on the loaded module); its GCS, raylet and workers then listen on 127.0.0.1
    instead of every interface (measured with ``ss -ltnp``), and a driver looks for a cluster on
    loopback at 127.0.0.1, not at the outward address (where it would wait for ever)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # also for Ray's own child processes
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
    return {"_node_ip_address": LOOPBACK}


def ray_init_args(address: str | None) -> dict:
    """``ray.init`` arguments for Flower's simulation backend. ``address`` None: a new local Ray on
    loopback — ``address="local"``, else ``ray.init`` joins any cluster someone started on this machine
    with ``ray start``. A ``host:port`` or ``ray://host:port`` address: that cluster, with the loopback
    settings when the host is this machine's loopback. ValueError when nothing answers at the address
    within 5 s (Ray itself retries for many minutes without saying why)."""
    if address is None:
        return {"address": "local", **ray_loopback()}
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ValueError(f"nothing answers at {host}:{port} ({e.strerror or e}); start the cluster first "
                         f"(`ray start --head --port {port}` on its head node)") from None
    return {"address": address, **(ray_loopback() if _is_loopback(host) else {})}


def _host_port(address: str) -> tuple[str, int]:
    bare = address.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
