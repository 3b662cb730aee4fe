"""Study signing: the coordinator signs every run it starts; a site serves only signed runs.

``medgen certs init`` makes the coordinator's study-signing key pair (Ed25519): ``study.key``
stays with ``medgen-server`` (mode 0600), ``study.pub`` goes to every site with ``ca.pem``.
After the SuperLink has given a run its id, ``medgen-server start`` (the parent process, not the
ServerApp: a rogue run's ServerApp code also runs on the coordinator's machine) signs

    {"fingerprint": study_fingerprint(<the medgen config YAML the sites receive>),
     "run-id": <the Flower run id>, "study": <the run directory's name>}

(canonical JSON) and hands the token to its ServerApp, which puts it in every message's config
(``study-signature``, with ``study-name``). A deployed site checks it in its ClientApp before it
reads any data (``check_study``): the signature must verify under the coordinator's ``study.pub``,
be made for this very run (a signature copied from another run is refused) and for exactly the
config this message carries. Someone who can start runs on the SuperLink without the study key
gets every site's refusal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medgen.deployment.certs import CertError

SIGNATURE_KEY = "study-signature"  # message config: the signed token (payload.signature, base64url)
NAME_KEY = "study-name"  # message config: the study's name (the run directory's name)
NODE_KEY = "study-key"  # node config: path of the coordinator's study.pub at this site
NODE_UNSIGNED = "allow-unsigned-studies"  # node config: "true" only for an --insecure test site
HANDOVER = Path("deployment") / "study-signature.json"  # in the run directory: medgen-server -> ServerApp


class SigningError(CertError):
    """A study key file is missing or unusable; the text names it."""


def study_fingerprint(config_text: str) -> str:
    """First 16 hex characters of the SHA-256 of the medgen config YAML text."""
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


def canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_study_key() -> tuple[bytes, bytes]:
    """(private key PEM, public key PEM) of a new Ed25519 study-signing key pair."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_signing_key(path: str | Path, flag: str = "--study-key") -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except FileNotFoundError:
        raise SigningError(f"{flag} {path}: study-signing key not found (make it with "
                           f"`medgen certs study --out DIR`, or `medgen certs init`)") from None
    except (ValueError, TypeError) as e:
        raise SigningError(f"{flag} {path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{flag} {path}: the study-signing key must be Ed25519, not {type(key).__name__}")
    return key


def load_verify_key(path: str | Path, flag: str = "--study-key") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise SigningError(f"{flag} {path}: the coordinator's study.pub not found (it comes with ca.pem)") from None
    except (ValueError, TypeError) as e:
        raise SigningError(f"{flag} {path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{flag} {path}: the study key must be Ed25519 (study.pub), not {type(key).__name__}")
    return key


def sign_study(key: Ed25519PrivateKey, run_id: int, study: str, config_text: str) -> str:
    """The token for run ``run_id`` of study ``study`` with this config text: payload.signature."""
    payload = canonical({"run-id": int(run_id), "study": study, "fingerprint": study_fingerprint(config_text)})
    return f"{_b64(payload)}.{_b64(key.sign(payload))}"


def _payload(token: str) -> tuple[dict, bytes, bytes]:
    encoded, _, signature = token.partition(".")
    raw = _unb64(encoded)
    payload = json.loads(raw)
    if not isinstance(payload, dict) or set(payload) != {"run-id", "study", "fingerprint"}:
        raise ValueError("unexpected payload")
    return payload, raw, _unb64(signature)


def study_identity(config: dict) -> tuple[str, str]:
    """(study name, config fingerprint) of a message config: the signed ones when it carries a
    signature (after ``check_study`` passed they are what this message holds), else the
    ``study-name`` entry (or "") and the fingerprint of its ``medgen-config`` text. For a site
    policy that lists the studies it serves by name or fingerprint."""
    token = str(config.get(SIGNATURE_KEY) or "")
    if token:
        try:
            payload = _payload(token)[0]
            return str(payload["study"]), str(payload["fingerprint"])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            pass
    return str(config.get(NAME_KEY) or ""), study_fingerprint(str(config.get("medgen-config") or ""))


def check_study(node_config: dict, run_id: int, config: dict) -> str | None:
    """Why this site must refuse the message (the text names what failed, never a file path), or
    None to serve it.

    A deployed site (its node config has ``site``) serves only runs signed with the coordinator's
    study key: node config ``study-key`` is the path of that ``study.pub``; the signature in the
    message config (``study-signature``) must verify under it, name this run (``run_id``, the
    message's ``context.run_id``) and the fingerprint of this message's ``medgen-config`` text,
    and ``study-name`` must be the signed study. Node config ``allow-unsigned-studies="true"``
    (``medgen-client join --insecure --no-study-signature``, a closed test network) skips the
    check. In simulation (no ``site`` in the node config) nothing is required: the researcher's
    own machine runs its own server and sites in one process tree.
    """
    if "site" not in node_config:
        return None
    if str(node_config.get(NODE_UNSIGNED, "")).lower() == "true":
        return None
    if not node_config.get(NODE_KEY):
        return ("study signature: this site has no study key configured (node config study-key: the "
                "coordinator's study.pub) and serves no unsigned study")
    try:
        key = load_verify_key(str(node_config[NODE_KEY]))
    except SigningError:
        return "study signature: this site's study key (study.pub) cannot be read or is not an Ed25519 public key"
    token = str(config.get(SIGNATURE_KEY) or "")
    if not token:
        return "study signature: the run is not signed with the coordinator's study key (no study-signature)"
    try:
        payload, raw, signature = _payload(token)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return "study signature: the study-signature is malformed"
    try:
        key.verify(signature, raw)
    except InvalidSignature:
        return ("study signature: the signature does not verify under this site's study key (signed with "
                "another key, or altered)")
    if payload["run-id"] != int(run_id):
        return (f"study signature: signed for run {payload['run-id']}, but this is run {run_id} "
                f"(a signature replayed from another run)")
    received = study_fingerprint(str(config.get("medgen-config") or ""))
    if payload["fingerprint"] != received:
        return (f"study signature: the run's config (fingerprint {received}) is not the config the "
                f"coordinator signed (fingerprint {payload['fingerprint']})")
    if str(config.get(NAME_KEY) or "") != payload["study"]:
        return (f"study signature: the message names study {str(config.get(NAME_KEY) or '')!r}, the "
                f"signature study {payload['study']!r}")
    return None


def hand_over(run_path: str | Path, run_id: int, study: str, token: str) -> Path:
    """``medgen-server``'s side: the token for ``run_id`` where its ServerApp looks for it
    (``token`` "" when the server has no study key: an --insecure test deployment)."""
    from medgen.deployment.certs import _write

    data = json.dumps({"run-id": int(run_id), "study": study, SIGNATURE_KEY: token}, indent=1).encode()
    return _write(Path(run_path) / HANDOVER, data)


def wait_for_signature(run_path: str | Path, run_id: int, timeout_s: float = 60.0) -> dict[str, str]:
    """The ServerApp's side: the message config entries (``study-signature``, ``study-name``) that
    ``medgen-server`` handed over for this run; SigningError after ``timeout_s`` seconds (a run not
    started by ``medgen-server start``, or one started for another run id)."""
    path, deadline = Path(run_path) / HANDOVER, time.monotonic() + timeout_s
    while True:
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            found = {}
        if found.get("run-id") == int(run_id):
            entries = {NAME_KEY: str(found["study"])}
            if found.get(SIGNATURE_KEY):
                entries[SIGNATURE_KEY] = str(found[SIGNATURE_KEY])
            return entries
        if time.monotonic() > deadline:
            raise SigningError(f"no study signature for run {run_id} from medgen-server within {timeout_s:g} s "
                               f"({path}): runs are started with `medgen-server start`")
        time.sleep(0.1)
