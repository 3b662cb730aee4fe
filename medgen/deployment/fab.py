"""The Flower App Bundle that `medgen-server` and `medgen simulate` submit: only a pyproject naming
medgen's ServerApp and ClientApp, and the run config keys they set. The code itself is the medgen installed at each end (nothing is installed at run
time); the handshake (medgen/deployment/handshake.py) checks that both ends run the same one."""

from __future__ import annotations

RUN_CONFIG_KEYS = ("medgen-config", "run-dir", "medgen-version", "model-fingerprint", "site-nodes", "simulation")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "medgen-federation"
version = "{version}"
description = "medgen federated study (the code is the medgen installed at each end)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "medgen"

[tool.flwr.app.components]
serverapp = "medgen.server.app:app"
clientapp = "medgen.client.app:app"

[tool.flwr.app.config]
{config}
"""


def build_fab(version: str) -> bytes:
    from medgen._compat.flwr import build_fab_from_files

    fab_version = version if version[:1].isdigit() else "0.0.0"
    config = "\n".join(f'{key} = ""' for key in RUN_CONFIG_KEYS)
    return build_fab_from_files({"pyproject.toml": PYPROJECT.format(version=fab_version, config=config).encode()})[0]
