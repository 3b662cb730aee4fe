"""The `medgen` console script, run as a user runs it."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import FAST_DATA, interruptible, make_plain_site

BIN = Path(sys.executable).parent
MEDGEN = str(BIN / "medgen")


def run(*args, cache):
    sets = [x for kv in [f"data.cache_dir={cache}", *FAST_DATA] for x in ("--set", kv)]
    return subprocess.run([MEDGEN, *map(str, args), *sets],
                          capture_output=True, text=True, timeout=300)


def test_config_show_and_bad_key(tmp_path):
    out = run("config", "show", "--set", "data.image_size=128", cache=tmp_path)
    assert out.returncode == 0
    assert yaml.safe_load(out.stdout)["data"]["image_size"] == 128
    bad = run("config", "show", "--set", "data.image_sise=128", cache=tmp_path)
    assert bad.returncode == 3 and "data.image_sise: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_check_good_bad_and_empty_sites(tmp_path):
    good = make_plain_site(tmp_path / "good", n_healthy=1, n_lesion=1)
    out = run("data", "check", good, cache=tmp_path / "c")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "layout: plain" in out.stdout and "scans: 2" in out.stdout
    assert "lesion subjects: 1" in out.stdout and "usable slices:" in out.stdout and "OK: usable" in out.stdout

    bad = make_plain_site(tmp_path / "bad", n_healthy=1, n_lesion=0)
    (bad / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    out = run("data", "check", bad, cache=tmp_path / "c")
    assert out.returncode == 1
    assert "broken.nii.gz" in out.stdout and "problems: 1" in out.stdout

    (tmp_path / "empty").mkdir()
    out = run("data", "check", tmp_path / "empty", cache=tmp_path / "c")
    assert out.returncode == 3 and "no NIfTI scans found" in out.stdout and "NOT USABLE" in out.stdout

    out = run("data", "check", tmp_path / "missing", cache=tmp_path / "c")
    assert out.returncode == 3 and "does not exist" in out.stdout


def test_synth_then_check(tmp_path):
    out = run("data", "synth", "--out", tmp_path / "cohort", "--sites", "A,B", "--subjects", "2",
              "--seed", "3", cache=tmp_path / "c")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cohort" / "overview.png").stat().st_size > 10_000
    out = run("data", "check", tmp_path / "cohort" / "A", tmp_path / "cohort" / "B", cache=tmp_path / "c")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("OK: usable") == 2


def test_synth_rejects_bad_flags(tmp_path):
    out = run("data", "synth", "--out", tmp_path / "x", "--subjects", "0", cache=tmp_path)
    assert out.returncode == 3 and "phantom.subjects_per_site" in out.stderr
    out = run("data", "synth", "--out", tmp_path / "x", "--sites", "A,A", cache=tmp_path)
    assert out.returncode == 3 and "sites.train" in out.stderr


def _colours(png: Path) -> tuple[int, int]:
    """(yellow pixels, red pixels) of a picture above its legend: the brain and lesion outlines of a
    site picture."""
    from matplotlib.image import imread

    rgb = imread(png)[..., :3]
    rgb = rgb[: int(0.9 * len(rgb))]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 0.8) & (g > 0.6) & (b < 0.4)).sum()), int(((r > 0.8) & (g < 0.35) & (b < 0.35)).sum())


def test_check_draws_a_picture_of_every_site(tmp_path):
    a = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=1)
    b = make_plain_site(tmp_path / "B", n_healthy=2, n_lesion=0)
    out = run("data", "check", f"{a}/", cache=tmp_path / "c")
    assert out.returncode == 0, out.stdout + out.stderr
    picture = tmp_path / "A-overview.png"
    assert f"picture: {picture}" in out.stdout
    yellow, red = _colours(picture)
    assert yellow > 200 and red > 20  # brain and lesion outlined

    out = run("data", "check", a, "--picture", tmp_path / "mine.png", cache=tmp_path / "c")
    assert out.returncode == 0 and (tmp_path / "mine.png").is_file()
    out = run("data", "check", a, b, "--picture", tmp_path / "pictures", cache=tmp_path / "c")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["A-overview.png", "B-overview.png"]
    assert _colours(tmp_path / "pictures" / "B-overview.png")[1] == 0  # no lesion at B
    out = run("data", "check", a, b, "--picture", tmp_path / "mine.png", cache=tmp_path / "c")
    assert out.returncode == 3 and "--picture must be a folder" in out.stderr
    out = run("data", "check", b, "--no-picture", cache=tmp_path / "c")
    assert out.returncode == 0 and "picture:" not in out.stdout and not (tmp_path / "B-overview.png").exists()


def test_a_picture_outlines_only_masks_with_an_edge(tmp_path):
    """A mask that fills its slice, or is empty, has no outline; a square inside the slice has one,
    and only in its colour."""
    import numpy as np

    from medgen.data.dataset import SiteSlices
    from medgen.data.picture import draw_site

    n, s = 6, 32
    images = np.random.default_rng(0).uniform(0.2, 0.6, (n, s, s)).astype(np.float32)
    full, empty = np.ones((n, s, s), bool), np.zeros((n, s, s), bool)
    square = empty.copy()
    square[:, 8:24, 8:24] = True

    def draw(brain, lesion, name):
        slices = SiteSlices("X", images, brain, lesion, lesion.any((1, 2)).astype(np.int64),
                            np.array(["a"] * 3 + ["b"] * 3), np.tile(np.arange(3), 2))
        return _colours(draw_site(slices, tmp_path / f"{name}.png", name))

    assert draw(full, empty, "full") == (0, 0)
    assert draw(empty, full, "empty") == (0, 0)
    yellow, red = draw(square, empty, "square")
    assert yellow > 100 and red == 0
    yellow, red = draw(full, square, "lesion")
    assert yellow == 0 and red > 100


def test_version_help_and_health_check_of_an_absent_server(capsys):
    from importlib.metadata import version

    from medgen.cli.main import main as medgen
    from medgen.cli.server import main as server
    from medgen.cli.client import main as client

    for entry, prog in ((medgen, "medgen"), (server, "medgen-server"), (client, "medgen-client")):
        with pytest.raises(SystemExit) as done:
            entry(["--version"])
        assert done.value.code == 0 and capsys.readouterr().out.strip() == f"{prog} {version('medgen')}"
    helped = subprocess.run([MEDGEN, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert all(c in helped for c in ("simulate", "train", "evaluate", "report", "data", "certs", "config", "130"))
    assert server(["health", "--insecure", "--address", "127.0.0.1:9", "--timeout", "0.5"]) == 4  # no answer
    assert server(["health"]) == 3  # no --ca: refused, the flag named


# ----------------------------------------------------------------------------- exit codes
def _exit(*args, cwd=None):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_each_kind_of_error_has_its_own_exit_code(tmp_path):
    from medgen.cli.exitcodes import TABLE

    out = _exit(BIN / "medgen", "simulate", "--no-such-flag")
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr
    out = _exit(BIN / "medgen-client", "join", "--data", tmp_path)
    assert out.returncode == 2 and "--site" in out.stderr
    out = _exit(BIN / "medgen-server", "start", "--insecure", "--set", "data.image_sise=64", cwd=tmp_path)
    assert out.returncode == 3 and "data.image_sise: unknown key" in out.stderr and "Traceback" not in out.stderr
    out = _exit(BIN / "medgen", "train", "--site", "A", "--out", tmp_path / "run",
                "--set", f"data.root={tmp_path / 'missing'}")
    assert out.returncode == 3 and f"{tmp_path / 'missing' / 'A'}: site folder does not exist" in out.stderr

    for command in (["medgen"], ["medgen", "data", "check"], ["medgen-server"], ["medgen-server", "start"],
                    ["medgen-client"], ["medgen-client", "join"]):
        helped = _exit(BIN / command[0], *command[1:], "--help")
        assert helped.returncode == 0 and TABLE in helped.stdout, command


def test_a_site_whose_policy_refuses_the_study_exits_5(tmp_path):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=1)
    join = [BIN / "medgen-client", "join", "--site", "A", "--data", site, "--dry-run",
            "--state-dir", tmp_path / "state",
            *(x for kv in [f"data.cache_dir={tmp_path / 'cache'}", *FAST_DATA] for x in ("--set", kv))]
    out = _exit(*join, "--set", "privacy.enabled=true")
    assert out.returncode == 0 and "this site's policy allows that study" in out.stdout, out.stdout + out.stderr
    out = _exit(*join, "--set", "privacy.enabled=false")
    assert out.returncode == 5 and "would REFUSE" in out.stdout and "require_dp" in out.stdout


def _handles_sigterm(pid: int) -> bool:
    """Whether the process has its own SIGTERM handler yet (run_command installs it)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    caught = next(line for line in status if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                             (signal.SIGTERM, 143, "stopped (SIGTERM)")])
def test_ctrl_c_and_sigterm_stop_with_one_line_and_their_codes(sig, code, said):
    from medgen.deployment.procs import free_port

    health = [BIN / "medgen-server", "health", "--insecure", "--address", f"127.0.0.1:{free_port()}",
              "--timeout", "120"]
    proc = subprocess.Popen(health, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    try:
        deadline = time.monotonic() + 60
        while not _handles_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code and err == f"{said}: every child process is stopped\n"
