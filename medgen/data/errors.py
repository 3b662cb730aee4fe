"""Errors for input data: each names the file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """One problem with one file (or folder) of input data."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # pickled (a Ray actor's error, a copy) as (path, problem), not as its message
        return type(self), (self.path, self.problem)


class SiteDataError(ValueError):
    """All problems found in one site folder (raised when ``data.on_bad_file`` is ``fail``)."""

    def __init__(self, site_dir: str | Path, problems: list[DataError]):
        self.site_dir = Path(site_dir)
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"site folder {self.site_dir}: {len(problems)} problem(s)\n{lines}")
