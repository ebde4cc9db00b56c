"""The site's list of approved app bundles: ``STATE_DIR/approvals/approved-apps.json``.

Only the site's admin changes it (``clinicfl-client approve``, ``revoke``): the folder is 0700 and
the file 0600, owned by the account that runs the site daemon. The gate reads it again for every
message, so a revocation takes effect at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

HASH = re.compile(r"[0-9a-f]{64}")


def approvals_file(state_dir: Path) -> Path:
    return state_dir / "approvals" / "approved-apps.json"


def read_approvals(path: Path) -> list[dict]:
    """The approved bundles: [{"sha256", "label", "approved-at"}]; a damaged file approves nothing."""
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [e for e in entries if isinstance(e, dict) and HASH.fullmatch(str(e.get("sha256", "")))]


def approved_hashes(path: Path) -> set[str]:
    return {e["sha256"] for e in read_approvals(path)}


def write_approvals(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".approved-", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(entries, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def approve(path: Path, sha256: str, label: str) -> bool:
    """Add a bundle; False when it was approved already."""
    sha256 = sha256.lower()
    if not HASH.fullmatch(sha256):
        raise ValueError(f"{sha256!r} is not a SHA-256 hex digest of an app bundle")
    entries = read_approvals(path)
    if any(e["sha256"] == sha256 for e in entries):
        return False
    entries.append({"sha256": sha256, "label": label, "approved-at": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_approvals(path, entries)
    return True


def revoke(path: Path, sha256: str) -> bool:
    entries = read_approvals(path)
    kept = [e for e in entries if e["sha256"] != sha256.lower()]
    if len(kept) == len(entries):
        return False
    write_approvals(path, kept)
    return True


def bundle_hash(data: bytes) -> str:
    """A Flower app bundle's hash, as flwr build, flwr run and the SuperLink compute it."""
    return hashlib.sha256(data).hexdigest()


def project_bundle(project: Path) -> bytes:
    """The bundle ``flwr run PROJECT`` builds (deterministic: fixed dates, sorted paths)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(project)
