"""The SuperLink side: start ``flower-superlink`` as a child on loopback and the fleet-only proxy
on the public address, wait on their health endpoints, and talk to the SuperLink's Control API
(register site keys, submit the run, follow it, stop it).

In Flower 1.41 one HTTPS port serves everything: the Fleet API (SuperNodes), the Control API
(``flwr`` CLI: register nodes, start / stop runs, read logs) and the Runtime API (the ServerApp
process), plus ``GET /health``. The Control API has no login in the open-source build: anyone who
can reach that port can start runs and register nodes. So the SuperLink listens on 127.0.0.1
only, and the public port is ``medgen/deployment/proxy.py``, which forwards the Fleet API and
``/health`` and nothing else — see README "Deployment".
"""

from __future__ import annotations

import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from medgen.deployment.certs import load_public_key
from medgen.deployment.procs import Child, flower_bin, flower_env


class DeploymentError(RuntimeError):
    """The deployment cannot go on; the text says which process, flag or file."""


class Refused(DeploymentError):
    """The server refused this site (its key, or its node): the text says why and whom to ask."""


@dataclass
class TLS:
    """Server-side TLS files; None means --insecure."""
    ca: Path
    cert: Path
    key: Path


def _verify(ca: Path | None) -> ssl.SSLContext | bool:
    if ca is None:
        return False
    ctx = ssl.create_default_context(cafile=str(ca))
    return ctx


def url(address: str, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{address}"


def wait_healthy(address: str, ca: Path | None, timeout: float, child: Child | None = None,
                 sni_hostname: str | None = None) -> float:
    """Poll ``GET /health`` until it answers 200; returns the seconds waited. ``sni_hostname``:
    the name to check the server certificate against, when ``address`` is a bare IP address."""
    t0 = time.monotonic()
    verify = _verify(ca)
    last = ""
    while time.monotonic() - t0 < timeout:
        if child is not None and not child.running():
            raise DeploymentError(f"{child.name} exited with code {child.proc.returncode} before it was healthy; "
                                  f"its log ({child.log_file}) ends:\n{child.tail()}")
        try:
            extensions = {"sni_hostname": sni_hostname} if sni_hostname and ca is not None else {}
            with httpx.Client(verify=verify, timeout=2.0) as client:
                status = client.get(f"{url(address, ca is not None)}/health", extensions=extensions).status_code
            if status == 200:
                return time.monotonic() - t0
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    raise DeploymentError(f"{address}/health did not answer within {timeout:g} s ({last})")


def start_superlink(host: str, port: int, tls: TLS | None, state_db: Path | None, log_file: Path,
                    flwr_home: Path, auth: bool = True) -> Child:
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation", "--isolation", "subprocess"]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        if auth:
            cmd.append("--enable-supernode-auth")
    if state_db is not None:
        cmd += ["--database", str(state_db)]
    return Child("SuperLink", cmd, log_file, env=flower_env(flwr_home))


def start_proxy(listen: str, upstream: str, tls: TLS | None, log_file: Path) -> Child:
    """The fleet-only reverse proxy (medgen/deployment/proxy.py) on ``listen`` (HOST:PORT) in front
    of the SuperLink at ``upstream`` (127.0.0.1:PORT)."""
    cmd = [sys.executable, "-m", "medgen.deployment.proxy", "--listen", listen, "--upstream", upstream]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--cert", str(tls.cert), "--key", str(tls.key), "--ca", str(tls.ca)]
    return Child("fleet proxy", cmd, log_file, env=flower_env())


class Control:
    """A Control API client (what the ``flwr`` CLI uses), without the CLI's config file."""

    def __init__(self, address: str, ca: Path | None):
        from medgen._compat.flwr import CliClientHttpInterceptor, ControlHttpClient, RuntimeVersionHttpInterceptor

        self.client = ControlHttpClient.from_server_address(
            server_address=address, insecure=ca is None,
            root_certificates=ca.read_bytes() if ca is not None else None,
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])

    def close(self) -> None:
        self.client.close()

    def register(self, public_key: Path, name: str) -> int:
        """Register a SuperNode public key; returns its node id. A key registered before (a
        server restarted on the same --state-db) keeps its node."""
        from medgen._compat.flwr import RegisterNodeRequest, public_key_to_bytes

        key = public_key_to_bytes(load_public_key(public_key))
        known = {n.public_key: n.node_id for n in self.nodes() if n.status != "unregistered"}
        if key in known:
            return known[key]
        return int(self.client.RegisterNode(RegisterNodeRequest(public_key=key, name=name)).node_id)

    def nodes(self) -> list:
        from medgen._compat.flwr import ListNodesRequest

        return list(self.client.ListNodes(ListNodesRequest()).nodes_info)

    def start_run(self, fab: bytes, run_config: dict, simulation=None) -> int:
        """Submit the app bundle ``fab`` with ``run_config``; returns the run id. ``simulation``: the
        ``SimulationConfig`` of a simulation SuperLink's run (SuperNodes, their resources)."""
        import hashlib

        from medgen._compat.flwr import Fab, StartRunRequest, fab_to_proto, user_config_to_proto

        req = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                              override_config=user_config_to_proto(run_config), federation="",
                              override_federation_config=simulation)
        res = self.client.StartRun(req)
        if not res.HasField("run_id"):
            raise DeploymentError(f"the SuperLink did not start the run{': ' + res.note if res.HasField('note') else ''}")
        return int(res.run_id)

    def run_status(self, run_id: int) -> tuple[str, str, str]:
        """(status, sub-status, details) of a run, e.g. ("finished", "completed", "")."""
        from medgen._compat.flwr import ListRunsRequest

        run = self.client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        return run.status.status, run.status.sub_status, run.status.details

    def stop_run(self, run_id: int) -> None:
        from medgen._compat.flwr import StopRunRequest

        self.client.StopRun(StopRunRequest(run_id=run_id))
