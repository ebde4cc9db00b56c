"""Where a result came from: the code's commit and the library versions it ran with.

Recorded in a run directory when a run starts (the model card reads it) and in every study's
``results.json``, so a figure can be traced to the code that produced it.
"""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SOURCE_ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("clinicfl", "flwr", "torch", "torchvision", "opacus", "pydicom", "numpy")


def library_versions() -> dict[str, str]:
    """The installed version of each library the model's results depend on, and Python's."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def source_commit(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """The git commit of the code in ``root`` and whether its tracked files differ from it.
    ``commit`` is None where the code is not a git checkout (a site's unpacked app bundle, whose
    sha256 identifies the code instead)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": bool(changed)}


def provenance() -> dict[str, Any]:
    """Commit and versions, as one JSON-able record."""
    return {**source_commit(), "versions": library_versions()}
