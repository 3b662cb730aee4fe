"""The Ray settings medgen changes beyond ``ray.init``'s documented arguments: a local Ray of its
own that listens on loopback only, and a Ray cluster on this machine's loopback that a driver can
reach. Written against ray 2.55 (the version flwr 1.41 pins); importing this module with another
ray installed raises :class:`medgen._compat.IncompatibleVersion` naming both versions (the
loopback-only listening rests on an undocumented Ray setting; ``constraints.txt`` pins the tested
ray). The version is read from the installed package's metadata: ray itself is not imported here
(Flower's simulation process starts it)."""

from __future__ import annotations

import importlib.metadata
import ipaddress
import socket

from medgen._compat import IncompatibleVersion, check_version

MINIMUM, BELOW = "2.55", "2.56"
try:
    INSTALLED = importlib.metadata.version("ray")
except importlib.metadata.PackageNotFoundError:
    raise IncompatibleVersion(f"ray is not installed; medgen's simulation needs ray>={MINIMUM},<{BELOW} "
                              f"(pip install -c constraints.txt -e .)") from None
check_version("ray", INSTALLED, MINIMUM, BELOW,
              "medgen keeps a local Ray on loopback through a Ray setting: medgen/_compat/ray.py")

CONNECT_TIMEOUT_S = 5.0


def ray_environment(address: str | None) -> dict[str, str]:
    """The environment under which Flower's simulation process starts Ray (its ``ray.init`` takes
    the address from ``RAY_ADDRESS``; Flower's simulation config has no key for it). ``address``
    None: a new local Ray — ``local``, else ``ray.init`` joins any cluster someone started on this
    machine with ``ray start``. A ``host:port`` or ``ray://host:port`` address: that cluster.
    ValueError when nothing answers at the address within 5 s (Ray itself retries for many
    minutes without saying why).

    A local Ray, or a cluster on this machine's loopback, also gets
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's single-machine mode): its node address is then
    127.0.0.1, where Ray 2.55 would otherwise use the machine's outward address — its GCS, raylet
    and workers listen on 127.0.0.1 instead of every interface (measured with ``ss -ltnp``), and a
    driver looks for a cluster on loopback at 127.0.0.1, not at the outward address (where it
    would wait for ever)."""
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if address is None:
        return {"RAY_ADDRESS": "local", **loopback}
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ValueError(f"nothing answers at {host}:{port} ({e.strerror or e}); start the cluster first "
                         f"(`ray start --head --port {port}` on its head node)") from None
    return {"RAY_ADDRESS": address, **(loopback if _is_loopback(host) else {})}


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
