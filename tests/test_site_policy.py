"""The site is sovereign: its policy against the server's config (refused before any data is read,
with the policy key named), the paths it owns, DP noise the server cannot reproduce, and its log of
everything it sent. Direct ClientApp messages for a deployed site, LocalGrid for a simulated one."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Context, Message, MessageType, RecordDict

from medgen._compat.flwr import TaskIdentity
from medgen.client import sent_log
from medgen.client.app import app as client_app
from medgen.client.policy import ensure_policy, policy_text, violations
from medgen.client.task import site_data, site_seed, train_local
from medgen.config import ConfigError, SitePolicy, dump_config, load_config, load_policy
from medgen.deployment.certs import make_study_keys
from medgen.deployment.handshake import server_handshake
from medgen.deployment.signing import load_signing_key
from medgen.models import build_model
from medgen.privacy.dp import SECRET_FILE, plan, secret_seed, site_secret
from medgen.server.rundir import RunDir
from medgen.server.federation import run_federation
from test_deployment import _message as deployment_message
from test_federation import LocalGrid, tiny_cfg, tiny_cohort  # noqa: F401  (fixture)

DP = ["privacy.enabled=true", "privacy.target_epsilon=8"]


@pytest.fixture(scope="module", autouse=True)
def study_key(tmp_path_factory):
    """The coordinator's study-signing key; deployed sites below hold its study.pub."""
    global SIGNING_KEY, STUDY_PUB
    made = make_study_keys(tmp_path_factory.mktemp("study"))
    SIGNING_KEY, STUDY_PUB = load_signing_key(made["study-key"]), made["study-pub"]


def _deployed(cfg, folder: Path, state: Path, policy: SitePolicy | None) -> Context:
    """The context a SuperNode started by `medgen-client join` gives the ClientApp."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    node = {"site": "A", "data-dir": str(folder), "state-dir": str(state), "policy": str(state / "policy.yaml"),
            "study-key": str(STUDY_PUB)}
    if policy is not None:
        state.mkdir(parents=True, exist_ok=True)
        (state / "policy.yaml").write_text(policy_text(policy))
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config=server_handshake(cfg), node_config=node)


SERVER_CHOSEN = Path(tempfile.gettempdir()) / f"medgen-server-chosen-{uuid.uuid4().hex}"  # a deployed site ignores it


def _message(cfg, kind, round_=1, arrays=None) -> Message:
    """A server message of run 1, signed as medgen-server signs it, naming a state folder of the
    server's choosing."""
    msg = deployment_message(cfg, kind, round_, arrays, sign=SIGNING_KEY)
    msg.content["config"]["state-root"] = str(SERVER_CHOSEN)
    return msg


# ----------------------------------------------------------------------------- the policy file
def test_policy_defaults_are_safe_and_the_file_round_trips(tmp_path):
    policy, created = ensure_policy(tmp_path / "policy.yaml")
    assert created and policy.require_dp and not policy.share_images and policy.privacy_unit == "subject"
    assert policy.max_epsilon == 10.0 and policy.allowed_studies == []
    assert load_policy(tmp_path / "policy.yaml") == policy
    assert "# refuse to train without DP-SGD" in (tmp_path / "policy.yaml").read_text()
    (tmp_path / "policy.yaml").write_text("require_dp: false\n")
    assert ensure_policy(tmp_path / "policy.yaml") == (SitePolicy(require_dp=False), False)  # never overwritten


def test_bad_policy_files_name_the_file_and_key(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("max_epsilon: -1\nshare_image: true\n")
    with pytest.raises(ConfigError) as e:
        load_policy(bad)
    text = str(e.value)
    assert str(bad) in text and "max_epsilon" in text and "share_image: unknown key" in text
    assert "share_images" in text  # the allowed keys are the policy's, not the study config's
    bad.write_bytes(b"\xff\xfe: [")
    with pytest.raises(ConfigError, match="cannot read site policy"):
        load_policy(bad)


@pytest.mark.parametrize("override, key", [
    ("privacy.enabled=false", "require_dp"),
    ("privacy.target_epsilon=50", "max_epsilon: privacy.target_epsilon=50 > 10"),
    ("privacy.max_epsilon=20", "max_epsilon: privacy.max_epsilon=20 > 10"),
    ("privacy.noise_multiplier=0.1", "min_noise_multiplier: privacy.noise_multiplier=0.1 < 0.5"),
    ("privacy.max_grad_norm=100", "max_grad_norm: privacy.max_grad_norm=100 > 10"),
    ("privacy.unit=slice", "privacy_unit"),
    ("evaluation.share_images=true", "share_images"),
    ("train.local_steps=100000", "max_local_steps: train.local_steps=100000 > 10000"),
])
def test_every_weakening_is_named_by_its_policy_key(override, key):
    cfg = load_config(None, DP + [override])
    found = violations(cfg, SitePolicy(), "A", ("study", "f" * 16))
    assert len(found) == 1 and found[0].startswith(key.split(":")[0]) and key in found[0], found
    assert violations(load_config(None, DP), SitePolicy(), "A", ("study", "f" * 16)) == []


def test_families_and_studies_the_site_agreed_to():
    cfg = load_config(None, DP + ["model.family=gan"])
    policy = SitePolicy(allow_families=["vae"], allowed_studies=["stroke-2027", "0123456789abcdef"])
    found = violations(cfg, policy, "A", ("rogue", "ffffffffffffffff"))
    assert [f.split(":")[0] for f in found] == ["allowed_studies", "allow_families"]
    assert violations(load_config(None, DP), policy, "A", ("stroke-2027", "x")) == []
    assert violations(load_config(None, DP), policy, "A", ("other", "0123456789abcdef")) == []
    # a held-out site never trains: the training keys do not apply, the image key does
    held = load_config(None, ["evaluation.share_images=true"])
    assert [f.split(":")[0] for f in violations(held, SitePolicy(), "D", ("s", "f"))] == ["share_images"]


def test_lesion_masks_enter_the_model_only_if_the_site_allows_it(tiny_cohort, tmp_path):
    """model.mask_conditioning feeds the site's lesion masks into the model (training and
    evaluation): refused by default, at training and held-out sites alike, naming the key; a
    deployed site refuses it before opening its data folder; allow_mask_conditioning lets it."""
    masked = ["model.family=ddpm", "model.mask_conditioning=true"]
    cfg = load_config(None, DP + masked)
    assert SitePolicy().allow_mask_conditioning is False
    for site in ("A", "D"):  # a training site, a held-out one
        found = violations(cfg, SitePolicy(), site, ("study", "f" * 16))
        assert [f.split(":")[0] for f in found] == ["allow_mask_conditioning"], found
        assert "model.mask_conditioning=true" in found[0]
        assert violations(cfg, SitePolicy(allow_mask_conditioning=True), site, ("study", "f" * 16)) == []
    assert violations(load_config(None, DP + masked[:1]), SitePolicy(), "A", ("study", "f" * 16)) == []
    # the real ClientApp at a deployed site: refused before reading data, in the site's log
    cfg = tiny_cfg(tiny_cohort, *DP, *masked)
    state = tmp_path / "state"
    reply = client_app(_message(cfg, MessageType.QUERY, 0), _deployed(cfg, tmp_path / "no-such-folder", state,
                                                                      SitePolicy()))
    assert "site A refuses by its policy: allow_mask_conditioning" in str(reply.content["info"]["refused"])
    assert not (tmp_path / "no-such-folder").exists()
    assert "allow_mask_conditioning" in sent_log.read(state)[-1]["reason"]
    reply = client_app(_message(cfg, MessageType.QUERY, 0), _deployed(cfg, tiny_cohort.root / "A", state,
                                                                      SitePolicy(allow_mask_conditioning=True)))
    assert "refused" not in reply.content["info"] and "error" not in reply.content["info"], reply.content["info"]


# ----------------------------------------------------------------------------- a deployed site
def test_a_deployed_site_refuses_before_reading_any_data(tiny_cohort, tmp_path):
    """DP off, ε raised, images asked for: refused with the key named; the data folder is never
    opened (it does not even exist), and the refusal is in the site's sent-message log."""
    state = tmp_path / "state"
    for override, key in (("privacy.enabled=false", "require_dp"), ("privacy.target_epsilon=30", "max_epsilon"),
                          ("evaluation.share_images=true", "share_images")):
        cfg = tiny_cfg(tiny_cohort, *DP, override)
        ctx = _deployed(cfg, tmp_path / "no-such-folder", state, SitePolicy())
        reply = client_app(_message(cfg, MessageType.QUERY, 0), ctx)
        refused = str(reply.content["info"]["refused"])
        assert f"site A refuses by its policy: {key}" in refused and "error" not in reply.content["info"]
        assert not (tmp_path / "no-such-folder").exists()
    log = sent_log.read(state)
    assert [e["status"] for e in log] == ["refused"] * 3 and log[0]["kind"] == "query"
    assert "require_dp" in log[0]["reason"] and "share_images" in log[2]["reason"]
    assert log[0]["records"]["info"]["keys"] == ["policy", "refused", "site"]  # what the site allows goes too
    assert "require_dp=true" in str(reply.content["info"]["policy"]) and "cache_dir" not in str(reply.content["info"])


def test_a_deployed_site_without_a_policy_file_gets_the_safe_defaults(tiny_cohort, tmp_path):
    cfg = tiny_cfg(tiny_cohort)  # no DP
    ctx = _deployed(cfg, tiny_cohort.root / "A", tmp_path / "state", None)
    reply = client_app(_message(cfg, MessageType.QUERY, 0), ctx)
    assert "require_dp" in str(reply.content["info"]["refused"])


def test_the_site_owns_its_paths(tiny_cohort, tmp_path):
    """The server's data.cache_dir and state-root are ignored: the slice cache and the ledger go
    to the site's own folders."""
    attacker = tmp_path / "attacker"
    cfg = tiny_cfg(tiny_cohort, *DP, f"data.cache_dir={attacker}")
    state = tmp_path / "state"
    ctx = _deployed(cfg, tiny_cohort.root / "A", state, SitePolicy(cache_dir=tmp_path / "site-cache"))
    reply = client_app(_message(cfg, MessageType.QUERY, 0), ctx)
    assert "refused" not in reply.content["info"] and reply.content["metrics"]["train-examples"] > 0
    assert not attacker.exists() and any((tmp_path / "site-cache").iterdir())
    state_dict = build_model(cfg).state_dict()
    reply = client_app(_message(cfg, MessageType.TRAIN, 1, state_dict), ctx)
    assert reply.content["metrics"]["epsilon"] > 0
    assert (state / "privacy-ledger.json").is_file() and (state / SECRET_FILE).is_file()
    assert not SERVER_CHOSEN.exists()


def test_the_lifetime_budget_spans_studies(tiny_cohort, tmp_path):
    """Two studies on one state folder: the second is refused once the ledger's ε would pass the
    policy's max_epsilon, at the site's own δ."""
    cfg = tiny_cfg(tiny_cohort, *DP, "privacy.target_epsilon=4", "federation.rounds=1")
    state = tmp_path / "state"
    ctx = _deployed(cfg, tiny_cohort.root / "A", state, SitePolicy(max_epsilon=6.0))
    weights = build_model(cfg).state_dict()
    first = client_app(_message(cfg, MessageType.TRAIN, 1, weights), ctx)
    assert "refused" not in first.content["info"]
    other_study = cfg.model_copy(update={"seed": 1})
    second = client_app(_message(other_study, MessageType.TRAIN, 1, weights), ctx)
    refused = str(second.content["info"]["refused"])
    assert "policy max_epsilon=6" in refused and "spent so far" in refused
    assert [e["status"] for e in sent_log.read(state)] == ["reply", "refused"]


def test_errors_sent_to_the_server_carry_no_path(tiny_cohort, tmp_path, capfd):
    folder = tmp_path / "hospital-export" / "patient-1234"
    folder.mkdir(parents=True)
    (folder / "sub-1234_T1w.nii.gz").write_bytes(b"not a nifti")
    cfg = tiny_cfg(tiny_cohort, *DP)
    ctx = _deployed(cfg, folder, tmp_path / "state", SitePolicy())
    reply = client_app(_message(cfg, MessageType.QUERY, 0), ctx)
    error = str(reply.content["info"]["error"])
    assert "1234" not in error and "hospital-export" not in error and "<" in error
    assert "sub-1234_T1w.nii.gz" in capfd.readouterr().err  # the site's own log keeps the file name


# ----------------------------------------------------------------------------- DP noise
def test_dp_noise_comes_from_the_site_secret(tiny_cohort, tmp_path):
    """Same study seed, different site secrets: different updates; the same secret: the same
    update (a resumed round); what the server can compute from its config: neither."""
    cfg = tiny_cfg(tiny_cohort, *DP, "privacy.noise_multiplier=1.0")
    data, _ = site_data(cfg, "A", tiny_cohort.root / "A")
    dp = plan(cfg, data, 3)
    start = build_model(cfg).state_dict()

    def update(seed):
        model = build_model(cfg)
        model.load_state_dict(start)
        train_local(model, data, cfg, seed, dp=dp)
        return torch.cat([v.flatten().float() for v in model.state_dict().values()])

    one, two = site_secret(tmp_path / "one"), site_secret(tmp_path / "two")
    assert one != two and len(one) == 32 and site_secret(tmp_path / "one") == one
    assert (tmp_path / "one" / SECRET_FILE).stat().st_mode & 0o077 == 0
    a = update(secret_seed(one, cfg.seed, "A", 1))
    assert torch.equal(a, update(secret_seed(one, cfg.seed, "A", 1)))
    assert not torch.allclose(a, update(secret_seed(two, cfg.seed, "A", 1)))
    assert not torch.allclose(a, update(site_seed(cfg, "A", 1)))


def test_an_empty_poisson_batch_takes_a_noise_only_step(tiny_cohort):
    cfg = tiny_cfg(tiny_cohort, *DP, "privacy.noise_multiplier=1.0")
    data, _ = site_data(cfg, "A", tiny_cohort.root / "A")
    dp = plan(cfg, data, 4)
    empty = dp.__class__(**{**dp.as_dict(), "sample_rate": 1e-9})  # every batch is empty
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = train_local(model, data, cfg, seed=0, dp=empty)
    assert metrics["steps"] == 4
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    private = {f"{n}." for n in model.private_networks}
    assert moved and all(any(k.startswith(p) for p in private) for k in moved)


# ----------------------------------------------------------------------------- simulated sites
def test_simulated_policies_refuse_and_the_federation_goes_on(tiny_cohort, tmp_path):
    """Site A's policy requires DP; the study has none: A refuses when asked, B trains, C
    evaluates; every site's sent-message log shows no image-shaped array."""
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", "federation.min_sites=1",
                   "sites.policies={A: {require_dp: true}, B: {require_dp: false}}")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    lines = []
    run_federation(LocalGrid(3), cfg, run, log=lines.append)
    assert run.status()["status"] == "completed"
    records = run.records()
    refused = [r for r in records if r["site"] == "A" and "refused" in r]
    assert refused and all("require_dp" in r["refused"] for r in refused)
    assert not any(r["site"] == "A" and r["phase"] == "train" and "loss" in r for r in records)
    assert any(r["site"] == "B" and r["phase"] == "train" and "loss" in r for r in records)
    assert any("site A: REFUSED the study" in line for line in lines)
    assert "require_dp=false" in next(r["policy"] for r in records if r["site"] == "B" and r["phase"] == "query")
    b = sent_log.read(run.path / "sites" / "B")
    assert [e["kind"] for e in b] == ["query", "train", "evaluate"]
    assert b[1]["records"]["arrays"]["bytes"] > 0
    for site in "ABC":
        for entry in sent_log.read(run.path / "sites" / site):
            assert all(not rec.get("image-shaped") for rec in entry.get("records", {}).values()), entry
    from medgen.evaluation.report import build_report

    page = (build_report(run.path).parent / "site-A.html").read_text()
    assert "What left the site" in page and "require_dp" in page


def test_a_study_every_missing_site_refused_exits_5_and_one_a_site_missed_exits_4(tiny_cohort, tmp_path):
    """Both training sites' policies refuse the study (no DP): the run fails as refused (its status
    says so, `medgen simulate` / `medgen-server start` exit 5) naming each refusal. A site that is
    missing for another reason (not connected) is a failed federation: exit 4."""
    from medgen.cli import exitcodes
    from medgen.cli.main import exit_code
    from medgen.server.errors import FederationError, StudyRefused

    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", "sites.policies={A: {}, B: {}}")  # the safe defaults
    run = RunDir(tmp_path / "refused")
    run.create(cfg)
    with pytest.raises(StudyRefused) as e:
        run_federation(LocalGrid(3), cfg, run, log=lambda _: None)
    assert "only 0 of 2 training sites are usable" in str(e.value) and "every other one refused" in str(e.value)
    assert "site A refuses by its policy: require_dp" in str(e.value) and "site B refuses" in str(e.value)
    assert run.status()["status"] == "failed" and run.status()["refused"] is True
    assert exit_code(e.value) == exitcodes.REFUSED == 5
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", "federation.query_timeout_s=1", "sites.policies={A: {}}")
    run = RunDir(tmp_path / "missing")
    run.create(cfg)
    with pytest.raises(FederationError) as e:
        run_federation(LocalGrid(1), cfg, run, log=lambda _: None)  # B (and C) never connect
    assert not isinstance(e.value, StudyRefused) and "refused" not in run.status()
    assert exit_code(e.value) == exitcodes.FAILED == 4


def test_policies_must_name_sites_of_the_study():
    with pytest.raises(ConfigError, match=r"policies: sites \['Z'\]"):
        load_config(None, ["sites.policies={Z: {require_dp: true}}"])
    cfg = load_config(None, ["sites.policies={A: {max_epsilon: 3}}"])
    assert cfg.sites.policies["A"].max_epsilon == 3 and cfg.sites.policies["A"].require_dp
    assert yaml.safe_load(dump_config(cfg))["sites"]["policies"]["A"]["max_epsilon"] == 3
    json.dumps(cfg.model_dump(mode="json"))


def test_medgen_client_sent_summarises_the_log(tiny_cohort, tmp_path, capsys):
    from medgen.cli.client import main

    cfg = tiny_cfg(tiny_cohort)
    client_app(_message(cfg, MessageType.QUERY, 0), _deployed(cfg, tiny_cohort.root / "A", tmp_path / "s", None))
    assert main(["sent", "--site", "A", "--state-dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "1 messages sent" in out and "query" in out and "refused" in out and "images: none" in out
    assert "run 1 round 0 query: site A refuses by its policy: require_dp" in out


def test_the_study_cannot_widen_what_a_site_reads(tiny_cohort, tmp_path):
    """A manifest naming another site's scan: the study's data.allow_external_paths=true does not
    make a deployed site read it; its own policy decides."""
    import shutil

    folder = tmp_path / "site"
    shutil.copytree(tiny_cohort.root / "A", folder)
    outside = next((tiny_cohort.root / "B").glob("*.nii.gz"))
    (folder / "manifest.csv").write_text(f"image\n{outside}\n")
    cfg = tiny_cfg(tiny_cohort, *DP, "data.allow_external_paths=true", "data.max_voxels=1000000000000")
    reply = client_app(_message(cfg, MessageType.QUERY, 0), _deployed(cfg, folder, tmp_path / "state", SitePolicy()))
    assert "error" in reply.content["info"] and "outside" in str(reply.content["info"]["error"])
    from medgen.client.policy import site_config

    mine = site_config(cfg, SitePolicy(), None)
    assert not mine.data.allow_external_paths and mine.data.max_voxels == SitePolicy().max_voxels
