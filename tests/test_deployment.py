"""Real deployment: `medgen certs`, `medgen-server start` on a real Flower SuperLink with TLS and
SuperNode authentication, `medgen-client join` SuperNodes, on a tiny phantom cohort. Nothing is
mocked: the end-to-end tests run the real binaries over loopback, one of them as an attacker who
holds only ca.pem. The site's side (handshake, study signature, what leaves a site) is also checked
directly on the ClientApp, without processes."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from conftest import FAST_DATA
from medgen._compat.flwr import TaskIdentity, set_message_id
from medgen.client import sent_log
from medgen.client.app import app as client_app
from medgen.config import dump_config, load_config
from medgen.deployment.certs import CertError, check_private_key, init_ca, make_site_keys
from medgen.deployment.fab import build_fab
from medgen.deployment.handshake import check_handshake, medgen_version, server_handshake
from medgen.deployment.node import NodeOptions, site_env
from medgen.deployment.procs import free_port
from medgen.deployment.worker import CLIENTAPP, fab_clientapp
from medgen.models import build_model
from medgen.server.rundir import RunDir, load_checkpoint
from medgen.simulation import resolve_data

BIN = Path(sys.executable).parent
TINY = ["sites.train=[A,B]", "sites.heldout=[C]", "phantom.subjects_per_site=3", "train.local_steps=3",
        "train.batch_size=8", "model.width=8", "model.latent_dim=16", "data.image_size=32",
        "federation.samples_per_class=2", "federation.round_timeout_s=120", *FAST_DATA]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(shared_cache):
    """The tiny phantom cohort (sites A, B, C) and its slice cache (the session's, conftest.py)."""
    cache = shared_cache
    data = resolve_data(load_config(None, TINY + [f"data.cache_dir={cache}"]), log=lambda _: None).data
    return Path(data.root), cache


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, the server certificate, keys for A, B, C (registered) and for D (never registered)."""
    folder = tmp_path_factory.mktemp("certs")
    init_ca(folder)
    for site in "ABC":
        make_site_keys(folder, site)
    outsider = tmp_path_factory.mktemp("outsider")
    make_site_keys(outsider, "D")
    return folder, outsider / "sites" / "D.key"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The coordinator's study-signing key and the study.pub file a site holds."""
    from medgen.deployment.certs import make_study_keys
    from medgen.deployment.signing import load_signing_key

    made = make_study_keys(tmp_path_factory.mktemp("study"))
    return load_signing_key(made["study-key"]), made["study-pub"]


def _context(cfg, site_folder: Path, run_config: dict, state_dir: Path | None = None,
             study_pub: Path | None = None, run_id: int = 1) -> Context:
    """A deployed site's context; its state folder holds a policy that allows the DP-free TINY study."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 7, 1
    state_dir = Path(state_dir or tempfile.mkdtemp(prefix="site-state-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "policy.yaml").write_text("require_dp: false\n")
    node_config = {"site": site_folder.name, "data-dir": str(site_folder), "state-dir": str(state_dir)}
    if study_pub is not None:
        node_config["study-key"] = str(study_pub)
    return Context(run_id=run_id, node_id=7, state=RecordDict(), run_config=run_config, node_config=node_config)


SERVER_STATE_ROOT = str(Path(tempfile.gettempdir()) / f"medgen-server-state-root-{uuid.uuid4().hex}")


def _message(cfg, kind: str, round_: int = 1, arrays=None, full: bool = False, sign=None, run_id: int = 1,
             config_text: str | None = None) -> Message:
    """A server message; ``sign`` (a study key) signs it for ``run_id`` as medgen-server does."""
    from flwr.app import ArrayRecord

    from medgen.deployment.signing import sign_study

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 7, 1  # set by Flower's runtime
    text = config_text if config_text is not None else dump_config(cfg)
    config = {"medgen-config": text, "round": round_, "state-root": SERVER_STATE_ROOT, "full": int(full)}
    if sign is not None:
        config.update({"study-signature": sign_study(sign, run_id, "study-1", dump_config(cfg)),
                       "study-name": "study-1"})
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    msg = Message(content=content, message_type=kind, dst_node_id=7)
    set_message_id(msg, uuid.uuid4().hex)
    return msg


# ----------------------------------------------------------------------------- certificates
def test_certs_make_a_ca_a_server_certificate_and_site_keys(tmp_path):
    made = init_ca(tmp_path, ["server.example.org", "10.0.0.5"])
    assert made["hosts"] == ["localhost", "127.0.0.1", "::1", "server.example.org", "10.0.0.5"]
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(made["cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "server.example.org" in san.get_values_for_type(x509.DNSName)
    assert oct(made["key"].stat().st_mode & 0o777) == "0o600" and oct(made["ca-key"].stat().st_mode & 0o777) == "0o600"
    keys = make_site_keys(tmp_path, "A")
    assert keys["pub"].read_text().startswith("ecdsa-sha2-nistp384 ")
    assert check_private_key(keys["key"]) == keys["key"]
    with pytest.raises(CertError, match="ca.key already exists"):
        init_ca(tmp_path)
    with pytest.raises(CertError, match="site name"):
        make_site_keys(tmp_path, "../evil")
    with pytest.raises(CertError, match=r"--key .*A.pub: not an unencrypted OpenSSH private key"):
        check_private_key(keys["pub"])


def test_cli_errors_name_the_flag_or_file(tmp_path):
    out = subprocess.run([BIN / "medgen-server", "start", "--port", str(free_port())], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 3 and "--ca" in out.stderr and "--insecure" in out.stderr
    out = subprocess.run([BIN / "medgen-client", "join", "--site", "A", "--server", "localhost:1", "--data",
                          str(tmp_path), "--ca", str(tmp_path / "nope.pem"), "--key", str(tmp_path / "k")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and "--ca" in out.stderr and "nope.pem" in out.stderr
    out = subprocess.run([BIN / "medgen-client", "join", "--site", "A", "--data", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and "--data" in out.stderr and "missing" in out.stderr


def test_study_key_flags_name_the_flag_or_file(certs, tmp_path):
    """A site needs the coordinator's study.pub (--study-key or <certs>/study.pub); unsigned runs
    only with --insecure --no-study-signature; a server without its study.key says how to make one."""
    folder, _ = certs
    join = [BIN / "medgen-client", "join", "--site", "A", "--server", "localhost:1", "--data", tmp_path,
            "--ca", folder / "ca.pem", "--key", folder / "sites" / "A.key"]
    run = lambda args: subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = run(join)
    assert out.returncode == 3 and "--study-key FILE is needed" in out.stderr
    out = run(join + ["--study-key", tmp_path / "nope.pub"])
    assert out.returncode == 3 and "--study-key" in out.stderr and "nope.pub" in out.stderr
    out = run(join + ["--study-key", folder / "ca.pem"])
    assert out.returncode == 3 and "not a PEM public key" in out.stderr
    out = run(join + ["--no-study-signature"])
    assert out.returncode == 3 and "--no-study-signature is only for an --insecure" in out.stderr
    bare = tmp_path / "bare"
    init_ca(bare)
    (bare / "study.key").unlink()
    out = run([BIN / "medgen-server", "start", "--port", free_port(), "--certs", bare, "--out", tmp_path / "run"])
    assert out.returncode == 3 and "--study-key" in out.stderr and "medgen certs study" in out.stderr
    assert not (tmp_path / "run").exists()
    made = subprocess.run([BIN / "medgen", "certs", "study", "--out", bare], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and (bare / "study.key").is_file() and "study.pub" in made.stdout


def test_client_dry_run_checks_the_data_and_says_what_is_shared(cohort):
    root, cache = cohort
    out = subprocess.run([BIN / "medgen-client", "join", "--site", "A", "--data", str(root / "A"), "--dry-run",
                          "--set", f"data.cache_dir={cache}", "--set", "data.image_size=32",
                          "--set", "privacy.enabled=true",  # a study the default policy serves
                          *(x for kv in FAST_DATA for x in ("--set", kv))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: usable" in out.stdout and "usable slices:" in out.stdout
    assert "Never sent: scans, masks, slices" in out.stdout


# ----------------------------------------------------------------------------- the site's side
def test_fab_names_medgen_apps_and_the_worker_runs_only_medgen():
    fab = build_fab(medgen_version())
    assert fab_clientapp(fab) == CLIENTAPP


def test_packed_weights_arrive_identical():
    """Between the server and a site worker, each ArrayRecord travels as one array plus its layout
    and is rebuilt exactly: names, order, dtypes (float, int, bool, double), shapes (0-d, empty)."""
    import torch
    from flwr.app import Array, ArrayRecord

    from medgen.deployment.packing import LAYOUT, pack, unpack

    state = {"w": torch.randn(3, 4), "count": torch.tensor(5), "mask": torch.tensor([True, False]),
             "empty": torch.zeros(0, 3), "double": torch.randn(2).double(), "strided": torch.randn(4, 4).t()}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"round": 1}),
                          "curves": ArrayRecord({"roc": Array(np.linspace(0, 1, 7))})})
    assert pack(content) and len(content["arrays"]) == 1 and LAYOUT in content
    assert unpack(content) and LAYOUT not in content and not unpack(content)
    back = content["arrays"].to_torch_state_dict()
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape and torch.equal(back[key], value)
    np.testing.assert_array_equal(content["curves"]["roc"].numpy(), np.linspace(0, 1, 7))
    assert content["config"]["round"] == 1


def test_version_handshake_refuses_with_both_versions(cohort, tmp_path):
    root, cache = cohort
    cfg = load_config(None, TINY + [f"data.cache_dir={cache}"])
    good = server_handshake(cfg)
    assert check_handshake(good, cfg) is None and check_handshake({}, cfg, required=False) is None
    assert "version handshake missing" in check_handshake({}, cfg)
    bad = {**good, "medgen-version": "0.0.1"}
    reply = client_app(_message(cfg, MessageType.QUERY), _context(cfg, root / "A", bad, tmp_path / "state"))
    error = str(reply.content["info"]["refused"])
    assert "medgen version mismatch" in error and "0.0.1" in error and medgen_version() in error
    # a model whose weights differ (other code, same config) is refused too
    other = {**good, "model-fingerprint": "vae-0000000000000000"}
    assert "model version mismatch" in check_handshake(other, cfg)


def test_a_deployed_site_serves_only_runs_signed_for_this_run_and_config(cohort, study, tmp_path):
    """check_study on the ClientApp: unsigned, signed with another key, a signature replayed from
    another run, a config altered after signing: refused before any data is read (the site folder
    does not exist, the attacker's cache stays empty), the reason names what failed and no path.
    A correctly signed message is served; the simulation needs no signature."""
    from medgen.deployment.signing import load_signing_key, make_study_key, study_fingerprint, study_identity

    root, cache = cohort
    key, pub = study
    attacker_cache = tmp_path / "attacker-cache"
    cfg = load_config(None, TINY + [f"data.cache_dir={attacker_cache}", "evaluation.share_images=true"])
    other = tmp_path / "other.key"
    other.write_bytes(make_study_key()[0])
    tampered = dump_config(cfg).replace("share_images: true", "share_images: false")
    assert tampered != dump_config(cfg)
    nowhere = tmp_path / "no-such-site" / "A"
    handshake = server_handshake(cfg)
    cases = {"no study-signature": _message(cfg, MessageType.QUERY),
             "does not verify under this site's study key": _message(cfg, MessageType.QUERY,
                                                                     sign=load_signing_key(other)),
             "signed for run 1, but this is run 2": _message(cfg, MessageType.QUERY, sign=key, run_id=1),
             "is not the config the coordinator signed": _message(cfg, MessageType.QUERY, sign=key,
                                                                  config_text=tampered)}
    for expected, msg in cases.items():
        run_id = 2 if "run 2" in expected else 1
        reply = client_app(msg, _context(cfg, nowhere, handshake, study_pub=pub, run_id=run_id))
        error = str(reply.content["info"]["refused"])
        assert error.startswith("study signature: ") and expected in error, error
        assert str(tmp_path) not in error and str(pub) not in error
    train = _message(cfg, MessageType.TRAIN, arrays=build_model(cfg).state_dict())
    reply = client_app(train, _context(cfg, nowhere, handshake, study_pub=pub))
    assert "study signature: the run is not signed" in str(reply.content["info"]["refused"])
    assert "arrays" not in reply.content
    # a site without a study key serves nothing; one with an unreadable key names no path either
    reply = client_app(_message(cfg, MessageType.QUERY, sign=key), _context(cfg, nowhere, handshake))
    assert "no study key configured" in str(reply.content["info"]["refused"])
    reply = client_app(_message(cfg, MessageType.QUERY, sign=key),
                       _context(cfg, nowhere, handshake, study_pub=tmp_path / "missing.pub"))
    assert "cannot be read" in str(reply.content["info"]["refused"]) and "missing.pub" not in str(reply.content["info"])
    # a deployed site refuses a run without the version handshake
    reply = client_app(_message(cfg, MessageType.QUERY, sign=key), _context(cfg, nowhere, {}, study_pub=pub))
    assert "version handshake missing" in str(reply.content["info"]["refused"])
    assert not attacker_cache.exists() and not nowhere.parent.exists()

    # correctly signed: served (the site's own data, the site's cache)
    good = load_config(None, TINY + [f"data.cache_dir={cache}"])
    msg = _message(good, MessageType.QUERY, sign=key)
    reply = client_app(msg, _context(good, root / "A", server_handshake(good), study_pub=pub))
    assert "error" not in reply.content["info"] and reply.content["metrics"]["train-examples"] > 0
    assert study_identity(dict(msg.content["config"])) == ("study-1", study_fingerprint(dump_config(good)))
    # simulation: no site in the node config, no handshake, no signature
    sim = good.model_copy(update={"data": good.data.model_copy(update={"root": root})})
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config={"partition-id": 0})
    reply = client_app(_message(sim, MessageType.QUERY), ctx)
    assert "error" not in reply.content["info"], reply.content["info"]


def test_private_keys_never_pass_through_a_planted_file(tmp_path):
    """Every private key is written through a fresh file of random name (O_EXCL, 0600) and renamed:
    a world-readable ``X.key.tmp`` or a symlink planted beside the key neither gets it nor is
    followed."""
    from medgen.deployment.certs import make_study_keys

    victim = tmp_path / "elsewhere.txt"
    victim.write_text("untouched")
    planted = {}
    for name in ("ca.key", "server.key", "study.key", "sites/A.key"):
        path = tmp_path / "certs" / f"{name}.tmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "server.key":
            path.symlink_to(victim)
        else:
            path.write_text("")
            path.chmod(0o666)
        planted[name] = path
    made = init_ca(tmp_path / "certs")
    made.update(make_site_keys(tmp_path / "certs", "A"))
    made.update(make_study_keys(tmp_path / "certs", force=True))
    assert victim.read_text() == "untouched"
    for name, path in planted.items():
        assert (path.is_symlink() and path.resolve() == victim) or path.read_text() == ""
    for key in ("ca-key", "key", "study-key"):
        assert oct(made[key].stat().st_mode & 0o777) == "0o600" and not made[key].is_symlink()
        assert b"PRIVATE KEY" in made[key].read_bytes()
    assert oct((tmp_path / "certs" / "study.pub").stat().st_mode & 0o777) == "0o644"
    leftovers = [p.name for p in (tmp_path / "certs").rglob(".*.tmp")]
    assert not leftovers, leftovers
    with pytest.raises(CertError, match="study.key already exists"):
        make_study_keys(tmp_path / "certs")


def test_the_public_proxy_forwards_only_the_fleet_api():
    from medgen.deployment.proxy import allowed

    assert allowed("POST", b"/v1/fleet/pull-messages") and allowed("POST", b"/v1/fleet/push-object")
    assert allowed("GET", b"/health") and allowed("HEAD", b"/health")
    for method, path in [("POST", b"/v1/control/list-runs"), ("POST", b"/v1/control/start-run"),
                         ("POST", b"/v1/runtime/pull-messages"), ("GET", b"/docs"), ("GET", b"/openapi.json"),
                         ("POST", b"/v1/fleet/../control/list-runs"), ("POST", b"/v1/fleet/%2e%2e/control/x"),
                         ("POST", b"/v1/fleet//control"), ("GET", b"/v1/fleet/get-run"), ("POST", b"/health"),
                         ("POST", b"/V1/fleet/pull-messages"), ("POST", b"/v1/fleet/pull-messages/")]:
        assert not allowed(method, path), (method, path)


def test_what_leaves_a_site_is_weights_and_aggregate_numbers(cohort, study, tmp_path):
    """Inspect every message a site sends (query, train, full evaluation): weights with the global
    model's keys and shapes, scalar numbers, short strings — no image-sized array, no path."""
    root, cache = cohort
    cfg = load_config(None, TINY + [f"data.cache_dir={cache}", "privacy.enabled=true",
                                    "privacy.noise_multiplier=1.0"])
    state = build_model(cfg).state_dict()
    key, pub = study
    ctx = _context(cfg, root / "A", server_handshake(cfg), state_dir=tmp_path / "site-state", study_pub=pub)
    replies = [client_app(_message(cfg, MessageType.QUERY, sign=key), ctx),
               client_app(_message(cfg, MessageType.TRAIN, arrays=state, sign=key), ctx),
               client_app(_message(cfg, MessageType.EVALUATE, arrays=state, full=True, sign=key), ctx)]
    for reply in replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert set(reply.content.keys()) <= {"metrics", "info", "arrays", "artefacts"}
        for key, value in reply.content["metrics"].items():
            assert isinstance(value, (int, float)) or (isinstance(value, list) and len(value) <= 64), key
        for key, value in reply.content["info"].items():
            assert str(root) not in str(value) and ".nii" not in str(value), key
        if "arrays" in reply.content:
            sent = reply.content["arrays"].to_torch_state_dict()
            assert sent.keys() == state.keys()
            assert all(sent[k].shape == state[k].shape for k in state)
        if "artefacts" in reply.content:  # curves only: images stay unless evaluation.share_images
            for key, array in reply.content["artefacts"].items():
                assert "overlay" not in key and np.asarray(array.numpy()).ndim <= 1, key
    # the privacy ledger is written where the SuperNode's state-dir says, not where the server says
    assert (tmp_path / "site-state" / "privacy-ledger.json").is_file()
    assert replies[1].content["metrics"]["epsilon"] > 0


# ----------------------------------------------------------------------------- end to end
def _ours(marker: str) -> list[str]:
    """Command lines of the live processes that mention ``marker`` (this test's folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z" and int(pid) != os.getpid():
            found.append(f"{pid}: {cmd}")
    return found


class Deployment:
    """A server and its sites as real processes, each in its own terminal-like subprocess."""

    def __init__(self, tmp: Path, cohort, certs):
        self.tmp, (self.root, self.cache), (self.certs, self.outsider_key) = tmp, cohort, certs
        self.port = free_port()
        # heartbeats every 10 s (Flower's minimum; 30 s by default): a SIGKILLed SuperNode or worker
        # is given up on after 20 s instead of 60 s (medgen/deployment/supernode.py)
        self.env = {**os.environ, "MEDGEN_CACHE_DIR": str(self.cache), "MEDGEN_CLIENT_THREADS": "1",
                    "MEDGEN_HEARTBEAT_S": "10"}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list) -> subprocess.Popen:
        log = (self.tmp / f"{name}.out").open("w")
        proc = subprocess.Popen([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.tmp)
        self.procs[name] = proc
        return proc

    def server(self, *extra, name="server") -> subprocess.Popen:
        sets = [x for kv in TINY for x in ("--set", kv)]
        return self.start(name, [BIN / "medgen-server", "start", "--address", "127.0.0.1", "--port", self.port,
                                 "--certs", self.certs, *sets, *extra])

    def site(self, site: str, key: Path | None = None, data: Path | None = None,
             policy: str = "require_dp: false\n") -> subprocess.Popen:
        """``medgen-client join`` with its own state folder and policy file (default: the TINY
        study's DP-free training allowed)."""
        key = key or self.certs / "sites" / f"{site}.key"
        (policy_file := self.tmp / f"policy-{site}.yaml").write_text(policy)
        return self.start(f"site-{site}", [BIN / "medgen-client", "join", "--site", site, "--server",
                                           f"localhost:{self.port}", "--data", data or self.root / site,
                                           "--ca", self.certs / "ca.pem", "--key", key,
                                           "--study-key", self.certs / "study.pub",
                                           "--state-dir", self.tmp / f"state-{site}", "--policy", policy_file])

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.out").read_text()

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running after {timeout} s; its output:\n{self.output(name)[-3000:]}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def deployment(tmp_path, cohort, certs):
    d = Deployment(tmp_path, cohort, certs)
    yield d
    d.stop_all()
    deadline = time.monotonic() + 15
    while _ours(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ours(str(tmp_path)), "processes left behind:\n" + "\n".join(_ours(str(tmp_path)))


def _wait_until(condition, d: Deployment, timeout: float, what: str, server: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert d.procs[server].poll() is None, d.output(server)[-3000:]
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{d.output(server)[-3000:]}"
        time.sleep(0.3)


def test_loopback_deployment(deployment):
    """One study over loopback with TLS and SuperNode authentication: sites A, B train, C is held out;
    a fourth site with an unregistered key is refused. Site B connects and is killed before round 1
    (the server waits for C, so the order is certain): round 1 goes on without it. The coordinator
    stops the server with SIGTERM after round 1 (nothing is left running), B joins again, and
    `--resume` goes on with both sites. After round 2 that server is SIGKILLed: its SuperLink,
    proxy, SuperExec and ServerApp end too and the port comes free; site C is SIGKILLed: its
    SuperNode and worker end. C starts again at once, and a second `--resume` finishes the study
    and writes the report. (One scenario: the deployment starts once for both kinds of stop.)"""
    from medgen.deployment.procs import descendants, port_free
    from medgen.watchdog import _start_time

    d = deployment
    run_dir = d.tmp / "run"
    run = RunDir(run_dir)
    d.server("--out", run_dir, "--set", "federation.rounds=3", "--set", "federation.min_sites=1")
    d.site("A"), d.site("B")
    d.site("D", key=d.outsider_key, data=d.root / "A")  # a key the server never registered

    connected = lambda: {r["site"] for r in run.records() if r["phase"] == "query" and "error" not in r}
    _wait_until(lambda: connected() >= {"A", "B"}, d, 240, "query replies from A and B")
    d.procs["site-B"].send_signal(signal.SIGTERM)  # site B goes away after connecting
    assert d.wait("site-B", 60) != 0
    d.site("C")  # the server has been waiting for C: round 1 starts now, without B
    _wait_until((run_dir / "checkpoints" / "round-0001.pt").is_file, d, 240, "round-0001.pt")
    # the unregistered site is refused, says so, and stops (checked while the server is surely up:
    # after the SIGTERM below its next attempt would be a connection failure, not a refusal)
    assert d.wait("site-D", 120) == 5  # refused
    assert "refused site D's key" in d.output("site-D")
    d.procs["server"].send_signal(signal.SIGTERM)
    assert d.wait("server", 60) != 0
    out = d.output("server")
    assert "TLS, SuperNode authentication" in out and "site A: connected" in out and "site C: connected" in out
    assert "round 1/3 site A: train" in out and "round 1 site C: evaluate (held-out)" in out
    assert f"--resume {run_dir}" in out and "site D" not in out
    assert run.status()["status"] == "failed" and "--resume" in run.status()["error"]
    # the SuperLink and the ServerApp it spawned are gone (the sites are still up)
    assert not [p for p in _ours(str(run_dir)) if "flower-superlink" in p or "flwr-serverapp" in p]
    records = run.records()
    assert [r["site"] for r in records if r["phase"] == "train" and r["round"] == 1 and "loss" in r] == ["A"]
    b_missing = [r["error"] for r in records if r["site"] == "B" and r["round"] == 1 and "error" in r]
    assert b_missing and "offline" in b_missing[0]

    # B comes back; the coordinator continues with --resume, until its server is SIGKILLed after round 2
    d.site("B")
    d.server("--resume", run_dir, name="server-2")
    # medgen-server prints what the ServerApp writes to server.log about once a second: wait for both
    _wait_until(lambda: (run_dir / "checkpoints" / "round-0002.pt").is_file()
                and "round 2/3 site B: train" in d.output("server-2"), d, 240, "round-0002.pt", server="server-2")

    def kill(name: str) -> list[int]:
        below = [p for p in descendants(d.procs[name].pid) if "medgen.watchdog" not in _cmdline(p)]
        assert below, f"{name} has no children"
        d.procs[name].send_signal(signal.SIGKILL)
        d.procs[name].wait()
        deadline = time.monotonic() + 30
        while [p for p in below if _start_time(p)] and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not [_cmdline(p) for p in below if _start_time(p)], f"{name}'s children live on"
        return below

    assert len(kill("server-2")) >= 3  # SuperLink, proxy, SuperExec / ServerApp
    assert port_free("127.0.0.1", d.port)
    out = d.output("server-2")
    assert "resuming after round 1" in out and "round 2/3 site B: train" in out and "round 1/" not in out
    kill("site-C")
    d.site("C")
    d.server("--resume", run_dir, name="server-3")
    assert d.wait("server-3", 300) == 0, d.output("server-3")[-4000:]
    out = d.output("server-3")
    assert "resuming after round 2" in out and "round 3/3 site B: train" in out and "round 1/" not in out
    records = run.records()
    trained = {site: [r["round"] for r in records if r["phase"] == "train" and r["site"] == site and "loss" in r]
               for site in "AB"}
    assert trained["A"] == [1, 2, 3] and trained["B"][-1] == 3 and 1 not in trained["B"]
    assert load_checkpoint(run.last_checkpoint())["round"] == 3 and run.status()["status"] == "completed"
    assert (run_dir / "report" / "index.html").is_file() and (run_dir / "report" / "site-C.html").is_file()
    heldout = [r for r in records if r["phase"] == "evaluate" and r["site"] == "C"]
    assert heldout[-1]["round"] == 3 and "pixel-auroc" in heldout[-1]
    assert (run.samples / "round-0003.png").is_file()
    # medgen-server's console lines, the three servers' one after the other, with times
    run_log = (run_dir / "run.log").read_text()
    assert run_log.index("round 1/3 site A: train") < run_log.index("resuming after round 2")
    # each site's own files stay in its state directory
    assert (d.tmp / "state-A" / "supernode.log").is_file() and (d.tmp / "state-A" / "flwr-home").is_dir()


def test_a_loopback_deployment_with_secure_aggregation(deployment):
    """Three deployed sites whose policies require secure aggregation (#23) serve a secaggplus study
    over loopback with TLS and SuperNode authentication: each site's secrets stay in its SuperNode's
    context between the four messages of a round, and the server logs only the sum."""
    d = deployment
    run_dir = d.tmp / "run"
    run = RunDir(run_dir)
    d.server("--out", run_dir, "--set", "sites.train=[A,B,C]", "--set", "sites.heldout=[]", "--set",
             "federation.rounds=1", "--set", "federation.secure_aggregation=secaggplus")
    for site in "ABC":
        d.site(site, policy="require_dp: false\nrequire_secure_aggregation: true\n")
    assert d.wait("server", 300) == 0, d.output("server")[-4000:]
    records = run.records()
    total = next(r for r in records if r["site"] == "global" and r["phase"] == "train")
    assert total["secagg-sites"] == 3 and total["secagg-dropped"] == 0 and run.status()["status"] == "completed"
    assert sorted(r["site"] for r in records if r["phase"] == "train" and "loss" in r) == ["A", "B", "C"]
    sent = sent_log.read(d.tmp / "state-A")
    assert [e["kind"] for e in sent if e["kind"].startswith("train")] == [
        "train.secagg_keys", "train.secagg_shares", "train", "train.secagg_unmask"]


def test_the_vqvae_cevae_and_flow_families_run_in_a_deployment(deployment):
    """#21: the same running sites serve three studies one after another, one per newer family
    (``model.family`` is the only change): A and B train, held-out C scores lesions, and each run
    completes with its samples, checkpoint and report."""
    d = deployment
    for site in "ABC":
        d.site(site)
    for family in ("vqvae", "cevae", "flow"):
        run_dir = d.tmp / f"run-{family}"
        run = RunDir(run_dir)
        d.server("--out", run_dir, "--set", f"model.family={family}", "--set", "federation.rounds=1",
                 name=f"server-{family}")
        assert d.wait(f"server-{family}", 300) == 0, d.output(f"server-{family}")[-4000:]
        records = run.records()
        assert sorted(r["site"] for r in records if r["phase"] == "train" and "loss" in r) == ["A", "B"], family
        heldout = [r for r in records if r["phase"] == "evaluate" and r["site"] == "C"]
        assert heldout and 0.0 <= heldout[-1]["pixel-auroc"] <= 1.0, (family, heldout)
        checkpoint = load_checkpoint(run.last_checkpoint())
        assert checkpoint["round"] == 1 and checkpoint["family"] == family and run.status()["status"] == "completed"
        assert (run.samples / "round-0001.png").is_file() and (run_dir / "report" / "site-C.html").is_file()


def test_a_site_whose_supernode_crashed_rejoins(deployment):
    """Site B's SuperNode is SIGKILLed mid-study: medgen-client starts it again; the SuperLink turns
    it away while it still counts the dead node as online, which the site waits out instead of
    taking it for a key refusal; B trains again in a later round."""
    from medgen.deployment.procs import descendants

    d = deployment
    run_dir = d.tmp / "run"
    run = RunDir(run_dir)
    d.server("--out", run_dir, "--set", "federation.rounds=200", "--set", "federation.min_sites=1",
             "--set", "sites.heldout=[]", "--set", "federation.round_timeout_s=20",
             "--set", "federation.query_timeout_s=120")
    d.site("A"), d.site("B")
    trained = lambda: [r["round"] for r in run.records() if r["site"] == "B" and r["phase"] == "train" and "loss" in r]
    _wait_until(lambda: len(trained()) >= 1, d, 240, "a round trained by B")
    node = [p for p in descendants(d.procs["site-B"].pid) if "medgen.deployment.supernode" in _cmdline(p)]
    assert len(node) == 1
    os.kill(node[0], signal.SIGKILL)
    crashed_after = max(trained())
    _wait_until(lambda: max(trained()) > crashed_after + 1, d, 200, "B training again after its crash")
    assert d.procs["site-B"].poll() is None
    out = d.output("site-B")
    assert "refused site B's key" not in out and "still counts this site's previous SuperNode as online" in out


def test_a_crash_looping_site_worker_is_restarted_each_time(deployment):
    """Site B's ClientApp worker (the process that runs medgen's ClientApp for its SuperNode) is
    SIGKILLed twice (a crash loop, kept short), each time once B has trained a round since the last crash:
    medgen-client starts it again every time, a round B misses names it and the reason, B trains
    again after every crash, and the study completes."""
    from medgen.deployment.procs import descendants

    d = deployment
    run_dir = d.tmp / "run"
    run = RunDir(run_dir)
    d.server("--out", run_dir, "--set", "federation.rounds=6", "--set", "federation.min_sites=1",
             "--set", "sites.heldout=[]", "--set", "federation.round_timeout_s=20",
             "--set", "federation.query_timeout_s=120")
    d.site("A"), d.site("B")
    trained = lambda: [r["round"] for r in run.records() if r["site"] == "B" and r["phase"] == "train" and "loss" in r]
    killed = []
    for _ in range(2):
        last = max(trained(), default=0)
        _wait_until(lambda: max(trained(), default=0) > last, d, 240, f"B training after round {last}")
        workers = [p for p in descendants(d.procs["site-B"].pid) if "medgen.deployment.worker" in _cmdline(p)]
        assert len(workers) == 1 and workers[0] not in killed, workers
        os.kill(workers[0], signal.SIGKILL)
        killed.append(workers[0])
    last = max(trained())
    assert d.wait("server", 300) == 0, d.output("server")[-4000:]
    assert max(trained()) > last, (trained(), d.output("server")[-3000:])
    assert d.procs["site-B"].poll() is None  # still serving: a crashed worker is not a reason to leave
    assert d.output("site-B").count("the ClientApp worker exited") >= 2
    records = run.records()
    missed = [r for r in records if r["site"] == "B" and r["phase"] in ("train", "evaluate") and "error" in r]
    assert all(r["error"].strip() for r in missed), missed
    assert run.status()["status"] == "completed" and load_checkpoint(run.last_checkpoint())["round"] == 6


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_deployed_sites_enforce_their_own_policies(deployment):
    """Two studies on the same running sites. Study 1 trains with DP-SGD at ε = 8: site A (default
    policy, lifetime budget 10) trains, site B (budget 5) refuses naming max_epsilon, held-out C
    evaluates. Study 2 turns DP off and asks for images: every site refuses, naming require_dp and
    share_images, and the run fails for want of sites. No image-shaped array leaves any site: not in
    the sites' own sent-message logs, not in what the server received."""
    d = deployment
    d.site("A", policy=""), d.site("B", policy="max_epsilon: 5\n"), d.site("C", policy="")
    first, second = d.tmp / "study-1", d.tmp / "study-2"
    d.server("--out", first, "--set", "federation.rounds=1", "--set", "federation.min_sites=1",
             "--set", "privacy.enabled=true", "--set", "privacy.target_epsilon=8")
    assert d.wait("server", 300) == 0, d.output("server")[-4000:]
    out = d.output("server")
    assert "site B: REFUSED the study" in out and "max_epsilon: privacy.target_epsilon=8 > 5" in out
    records = RunDir(first).records()
    assert [r["site"] for r in records if r["phase"] == "train" and "loss" in r] == ["A"]
    assert next(r for r in records if r["site"] == "A" and r["phase"] == "train")["epsilon"] <= 8.0 * 1.02
    assert any(r["site"] == "C" and r["phase"] == "evaluate" and "pixel-auroc" in r for r in records)
    assert "require_dp=true" in next(r["policy"] for r in records if r["site"] == "A" and r["phase"] == "query")

    d.server("--out", second, "--set", "federation.rounds=1", "--set", "evaluation.share_images=true",
             name="server-2")
    assert d.wait("server-2", 300) == 5  # refused by the sites' policies (exitcodes.REFUSED), not a failure (4)
    out = d.output("server-2")
    for site in "ABC":
        assert f"site {site}: REFUSED the study" in out, out[-3000:]
    assert "require_dp: the study trains without DP-SGD" in out and "share_images: the study sets" in out
    assert "only 0 of 2 training sites are usable" in out

    for site in "ABC":
        log = sent_log.read(d.tmp / f"state-{site}")
        assert log and {e["status"] for e in log} >= {"refused"}
        for entry in log:
            assert all(not rec.get("image-shaped") for rec in entry.get("records", {}).values()), entry
    for arrays in (first / "evaluation").glob("round-*/*.npz"):
        keys = set(np.load(arrays).files)
        assert not {k for k in keys if "overlay" in k or k in ("memorisation-generated", "memorisation-train")}, keys
        assert all(np.load(arrays)[k].ndim <= 1 for k in keys), arrays


ROGUE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "rogue-study"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "attacker"

[tool.flwr.app.components]
serverapp = "rogue:app"
clientapp = "medgen.client.app:app"

[tool.flwr.app.config]
medgen-config = ""
medgen-version = ""
model-fingerprint = ""
rogue-plan = ""
rogue-out = ""
"""

ROGUE_SERVERAPP = """\
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    rc = context.run_config
    nodes, deadline = [], time.monotonic() + 60
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    results = {}
    for name, (kind, config) in json.loads(str(rc["rogue-plan"])).items():
        msgs = [Message(RecordDict({"config": ConfigRecord(config)}), message_type=kind, dst_node_id=n) for n in nodes]
        replies = grid.send_and_receive(msgs, timeout=60)
        results[name] = [r.error.reason if r.has_error() else dict(r.content["info"]) for r in replies]
    Path(str(rc["rogue-out"])).write_text(json.dumps(results, default=str))
"""


def test_a_rogue_run_reaches_no_site(deployment):
    """An attacker holding only ca.pem: (a) the public port answers the Fleet API only — ListRuns,
    StartRun, RegisterNode fail there (and work on the SuperLink's loopback port); (b) a run
    started through the loopback Control API, with an app bundle of its own naming medgen's
    ClientApp and a config of its choosing (images shared, its own cache folder), unsigned or with
    the legitimate run's signature replayed, is refused by the site, before any data is read. The
    signed study then completes."""
    import httpx
    from medgen._compat.flwr import ListRunsRequest, RegisterNodeRequest, build_fab_from_files, public_key_to_bytes
    from medgen.deployment.certs import load_public_key
    from medgen.deployment.link import Control

    d = deployment
    run_dir, ca = d.tmp / "run", d.certs / "ca.pem"
    run = RunDir(run_dir)
    d.server("--out", run_dir, "--set", "federation.rounds=1", "--set", "sites.heldout=[]")
    d.site("A")  # the study waits for B: meanwhile the attacker tries its runs
    connected = lambda: {r["site"] for r in run.records() if r["phase"] == "query" and "error" not in r}
    _wait_until(lambda: "A" in connected(), d, 240, "a query reply from A")
    link_port = int(re.search(r"Control API and Runtime API on 127\.0\.0\.1:(\d+) only", d.output("server"))[1])
    legit = json.loads((run_dir / "deployment" / "study-signature.json").read_text())
    assert legit["study-signature"] and legit["study"] == "run"

    # (a) the public port: no Control API, no Runtime API, no docs
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as web:
        for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/register-node",
                     "/v1/runtime/pull-messages", "/v1/fleet/../control/list-runs"):
            assert web.post(f"https://localhost:{d.port}{path}", content=b"").status_code == 404, path
        assert web.get(f"https://localhost:{d.port}/docs").status_code == 404
        assert web.get(f"https://localhost:{d.port}/health").status_code == 200
    outsider_key = public_key_to_bytes(load_public_key(d.outsider_key.with_suffix(".pub")))
    public = Control(f"localhost:{d.port}", ca)
    fab = build_fab_from_files({"pyproject.toml": ROGUE_PYPROJECT.encode(), "rogue.py": ROGUE_SERVERAPP.encode()})[0]
    for attempt in (lambda: public.client.ListRuns(ListRunsRequest()),
                    lambda: public.client.RegisterNode(RegisterNodeRequest(public_key=outsider_key, name="evil")),
                    lambda: public.start_run(fab, {})):
        with pytest.raises(Exception):
            attempt()
    public.close()

    # (b) through the loopback Control API (someone on the coordinator's machine)
    inside = Control(f"localhost:{link_port}", ca)
    assert inside.run_status(legit["run-id"])[0] == "running"
    attacker_cache = d.tmp / "attacker-cache"
    cfg = load_config(None, TINY + ["sites.heldout=[]", f"data.cache_dir={attacker_cache}",
                                    "evaluation.share_images=true"])
    text = dump_config(cfg)
    base = {"medgen-config": text, "round": 1, "state-root": str(d.tmp / "attacker-state"), "full": 1}
    replayed = {**base, "study-signature": legit["study-signature"], "study-name": legit["study"]}
    plan = {"unsigned": ["query", base], "replayed": ["query", replayed], "train": ["train", replayed]}
    out = d.tmp / "rogue.json"
    rogue_id = inside.start_run(fab, {"medgen-config": text, **server_handshake(cfg), "rogue-plan": json.dumps(plan),
                                      "rogue-out": str(out)})
    _wait_until(out.is_file, d, 180, "the rogue run's results")
    results = json.loads(out.read_text())
    assert "the run is not signed" in results["unsigned"][0]["refused"]
    assert f"signed for run {legit['run-id']}, but this is run {rogue_id}" in results["replayed"][0]["refused"]
    assert "study signature" in str(results["train"][0])
    assert not attacker_cache.exists() and not (d.tmp / "attacker-state").exists()
    inside.close()

    d.site("B")  # the signed study goes on
    assert d.wait("server", 240) == 0, d.output("server")[-4000:]
    assert "REFUSED: study signature" in d.output("site-A")
    trained = {r["site"] for r in run.records() if r["phase"] == "train" and "loss" in r}
    assert trained == {"A", "B"} and run.status()["status"] == "completed"


def test_a_site_is_accepted_only_from_the_node_of_its_registered_key(cohort, tmp_path):
    """With SuperNode authentication the server knows which node each site's key belongs to: a
    node claiming another site's name is refused, with both node ids in the log and metrics."""
    from test_federation import LocalGrid  # the real ClientApp behind an in-process transport

    from medgen.server.errors import FederationError
    from medgen.server.federation import run_federation

    root, cache = cohort
    cfg = load_config(None, TINY + [f"data.cache_dir={cache}", f"data.root={root}", "federation.rounds=1",
                                    "federation.round_timeout_s=5"])
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    lines = []
    # LocalGrid's node 100 + i is site i of sites.train + sites.heldout (A, B, C): swap A and B
    with pytest.raises(FederationError, match="only 0 of 2 training sites"):
        run_federation(LocalGrid(3), cfg, run, lines.append, site_nodes={"A": 101, "B": 100, "C": 102})
    assert any("node 100 claims site 'A', but site A's registered key belongs to node 101" in x for x in lines)
    errors = {r["site"]: r["error"] for r in run.records() if "error" in r}
    assert "claims site" in errors["A"] and "claims site" in errors["B"] and "C" not in errors


def test_a_site_trains_on_all_its_cores_unless_told(monkeypatch, tmp_path):
    opts = NodeOptions("A", "localhost:9092", tmp_path / "A", tmp_path / "state", None, None)
    monkeypatch.delenv("MEDGEN_CLIENT_THREADS", raising=False)
    assert site_env(opts)["MEDGEN_CLIENT_THREADS"] == str(os.cpu_count())
    monkeypatch.setenv("MEDGEN_CLIENT_THREADS", "3")
    assert site_env(opts)["MEDGEN_CLIENT_THREADS"] == "3"


def test_the_heartbeat_interval_is_flowers_unless_told(monkeypatch):
    """MEDGEN_HEARTBEAT_S sets the SuperNode's and the worker's heartbeats; unset it is Flower's
    30 s; a value the SuperLink would refuse is named before anything starts."""
    from medgen._compat.flwr import HEARTBEAT_DEFAULT_INTERVAL, heartbeat_intervals, use_heartbeat
    from medgen.config import ConfigError
    from medgen.deployment.node import join
    from medgen.deployment.supernode import heartbeat_s

    monkeypatch.delenv("MEDGEN_HEARTBEAT_S", raising=False)
    assert heartbeat_s() == HEARTBEAT_DEFAULT_INTERVAL == 30
    monkeypatch.setenv("MEDGEN_HEARTBEAT_S", "12")
    assert heartbeat_s() == 12.0
    before = heartbeat_intervals()
    assert len(before) >= 3 and set(before.values()) == {30}
    try:
        use_heartbeat(12.0)
        assert set(heartbeat_intervals().values()) == {12.0}
    finally:
        use_heartbeat(30)
    for bad, why in (("5", "must be between 10 and"), ("ten", "not a number")):
        monkeypatch.setenv("MEDGEN_HEARTBEAT_S", bad)
        with pytest.raises(ConfigError, match=f"MEDGEN_HEARTBEAT_S='?{bad}'?: {why}"):
            join(NodeOptions("A", "localhost:1", Path("/nonexistent"), Path("/nonexistent/state"), None, None))


def test_polls_grow_to_their_cap_and_start_short_after_activity(monkeypatch):
    """A Poll sleeps first, ×factor each call, never above cap, and starts again from first after
    a reset or a pause; the SuperNode's waits (Flower's idle 3 s and reply 0.5 s) are Polls capped
    at MEDGEN_SUPERNODE_POLL_S that restart whenever the SuperNode switches from one to the other."""
    from medgen.deployment import polling
    from medgen.deployment.polling import Poll
    from medgen.deployment.supernode import IDLE_FIRST_S, REPLY_FIRST_S, polling_time

    slept = []
    monkeypatch.setattr(polling.time, "sleep", slept.append)
    poll = Poll(first=0.01, cap=0.05, factor=2.0)
    assert [poll.wait() for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    poll.reset()
    assert poll.wait() == 0.01
    poll._ended -= 1.0  # a second of work since the last wait
    assert poll.wait() == 0.01
    with pytest.raises(ValueError, match="first=0.5, cap=0.1"):
        Poll(first=0.5, cap=0.1)

    slept.clear()
    shim = polling_time(0.25)
    for seconds in (3, 3, 3, 0.5, 0.5, 3, 3):
        shim.sleep(seconds)
    assert slept[:3] == [IDLE_FIRST_S, IDLE_FIRST_S * 1.5, IDLE_FIRST_S * 1.5 ** 2]
    assert slept[3:5] == [REPLY_FIRST_S, REPLY_FIRST_S * 1.5] and slept[5:] == [IDLE_FIRST_S, IDLE_FIRST_S * 1.5]
    for _ in range(20):
        shim.sleep(3)
    assert slept[-1] == 0.25 == max(slept)
