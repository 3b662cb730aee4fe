"""medgen: federated generative modelling of brain MRI across hospitals."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medgen")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "unknown"
