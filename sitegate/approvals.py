"""The site's list of approved app bundles: ``STATE_DIR/approvals/approved-apps.json``.

The account that runs the site daemon (and so every approved bundle) must not be able to change
the list, or any code it runs could approve more. The list is therefore trusted only when the file
and its folder belong to root, or to the site's approvals admin (the account named in
``CLINICFL_APPROVALS_ADMIN``, when the site sets it), and neither is writable by group or others.
``clinicfl-client approve`` and ``revoke``, run as root (or as that admin), write it so: the folder
``0755``, the file ``0644``, both owned by the account that ran them. The gate reads the list again
for every message, so a revocation takes effect at once; a list that is not trusted approves
nothing, and the error says the exact ``chown``/``chmod`` that fixes it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pwd
import re
import stat
import tempfile
import time
from pathlib import Path

HASH = re.compile(r"[0-9a-f]{64}")
ADMIN_ENV = "CLINICFL_APPROVALS_ADMIN"
# Set by the gate's task process (one per message) to the bundle hash it checked before running
# the app: the app reports to the centre that this site's gate approved the bundle (model card).
APPROVED_BUNDLE_ENV = "CLINICFL_GATE_APPROVED_SHA256"
FILE_MODE = 0o644  # the daemon's account reads it; only the owner writes
FOLDER_MODE = 0o755


class ApprovalsError(ValueError):
    """The approvals list cannot be trusted or written; the message says how to fix it."""


def approvals_file(state_dir: Path) -> Path:
    return state_dir / "approvals" / "approved-apps.json"


def _account(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def trusted_owners() -> dict[int, str]:
    """The accounts that may own (and so change) the approvals list, by uid: root, and the site's
    approvals admin when ``CLINICFL_APPROVALS_ADMIN`` names one (a user name or a uid)."""
    owners = {0: "root"}
    admin = os.environ.get(ADMIN_ENV, "").strip()
    if admin.isdigit():
        owners[int(admin)] = _account(int(admin))
    elif admin:
        try:
            owners[pwd.getpwnam(admin).pw_uid] = admin
        except KeyError:
            raise ApprovalsError(f"{ADMIN_ENV}={admin}: there is no such account here; set it to the user name "
                                 "of the site's approvals admin, or unset it so that only root may change the list"
                                 ) from None
    return owners


def _owner_text(owners: dict[int, str]) -> str:
    admins = [name for uid, name in owners.items() if uid != 0]
    return f"root or the approvals admin {admins[0]} ({ADMIN_ENV})" if admins \
        else f"root (no approvals admin is set: {ADMIN_ENV})"


def _problems(path: Path, info: os.stat_result, mode: int, owners: dict[int, str]) -> list[str]:
    """What makes ``path`` (the list or its folder) changeable by an account that is not trusted."""
    problems = []
    if info.st_uid not in owners:
        problems.append(f"{path} belongs to {_account(info.st_uid)}, not to {_owner_text(owners)}, so that account "
                        f"could approve app bundles; fix (as root): chown root:root {path} && chmod {mode:04o} {path}")
    writable = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit]
    if writable:
        problems.append(f"{path} is writable by {' and '.join(writable)} (mode {stat.S_IMODE(info.st_mode):04o}), so "
                        f"accounts other than its owner could approve app bundles; fix: chmod {mode:04o} {path}")
    return problems


def _untrusted(problems: list[str]) -> ApprovalsError:
    return ApprovalsError("approvals list not trusted: " + "; ".join(problems))


def _read_bytes(path: Path, owners: dict[int, str] | None) -> bytes | None:
    """The file's bytes, None when it does not exist; with ``owners``, only from a trusted file and
    folder (checked on the open file itself, so it cannot be swapped between check and read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ApprovalsError(f"cannot read the approvals list {path} as {_account(os.geteuid())}; fix (as root): "
                             f"chmod {FOLDER_MODE:04o} {path.parent} && chmod {FILE_MODE:04o} {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ApprovalsError(f"the approvals list {path} is a symbolic link; replace it with the file itself "
                                 "(clinicfl-client approve writes it)") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ApprovalsError(f"the approvals list {path} is not a regular file")
        if owners is not None:
            problems = _problems(path, info, FILE_MODE, owners) + \
                _problems(path.parent, os.stat(path.parent), FOLDER_MODE, owners)
            if problems:
                raise _untrusted(problems)
        return handle.read()


def read_approvals(path: Path, trusted_only: bool = True) -> list[dict]:
    """The approved bundles: [{"sha256", "label", "approved-at"}]; a missing or damaged file
    approves nothing. Raises ApprovalsError when the list could have been changed by an account that
    is not trusted (``trusted_only=False``: read it anyway, for the admin to review)."""
    data = _read_bytes(path, trusted_owners() if trusted_only else None)
    if data is None:
        return []
    try:
        entries = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and HASH.fullmatch(str(e.get("sha256", "")))]


def approved_hashes(path: Path) -> set[str]:
    """The approved hashes; raises ApprovalsError when the list is not trusted."""
    return {e["sha256"] for e in read_approvals(path)}


def approvals_warnings(path: Path) -> list[str]:
    """Weaknesses that do not make the list untrusted today, for the gate's log at its start."""
    warnings = []
    if os.geteuid() != 0 and os.geteuid() in trusted_owners():
        warnings.append(f"the approvals admin ({ADMIN_ENV}) is {_account(os.geteuid())}, the account that runs the "
                        "app bundles: an approved bundle could change the list (single-account test setups only)")
    folder = path.parent
    if os.access(folder.parent, os.W_OK) and not _read_only_mount(folder):
        warnings.append(f"{folder.parent} is writable by this account, which could therefore put an older copy of "
                        f"{folder} back in its place (undoing a revocation); deploy/clinicfl-client.service prevents "
                        f"that with ReadOnlyPaths={folder}")
    return warnings


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def write_approvals(path: Path, entries: list[dict]) -> None:
    """Write the list as the account running this (root or the approvals admin), folder 0755 and
    file 0644; refuses where the result would not be trusted, before changing anything."""
    owners, writer = trusted_owners(), os.geteuid()
    if writer not in owners:
        name = _account(writer)
        raise ApprovalsError(f"only {_owner_text(owners)} may change the approvals list, and this is {name}: run "
                             f"it as root (sudo clinicfl-client ...), or, on a single-account test machine, set "
                             f"{ADMIN_ENV}={name} for this command and for the site daemon")
    folder = path.parent
    if writer == 0 and not folder.parent.exists():
        # Created by root here, the state folder would be closed to the daemon's own account.
        raise ApprovalsError(f"the state folder {folder.parent} does not exist: create it for the account that runs "
                             f"the site daemon first, e.g. install -d -o clinicfl -g clinicfl -m 0750 {folder.parent}")
    folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    if os.stat(folder).st_uid == writer:
        os.chmod(folder, FOLDER_MODE)  # a folder from an older release was 0700: the daemon must read it
    problems = _problems(folder, os.stat(folder), FOLDER_MODE, owners)
    if problems:
        raise _untrusted(problems)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".approved-", suffix=".tmp")
    except PermissionError:
        owner = _account(os.stat(folder).st_uid)
        raise ApprovalsError(f"{_account(writer)} cannot write in {folder}, which belongs to {owner}: run this as "
                             f"that account (root: sudo clinicfl-client ...)") from None
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle, indent=2)
            handle.flush()
            os.fchmod(handle.fileno(), FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def approve(path: Path, sha256: str, label: str) -> bool:
    """Add a bundle; False when it was approved already. Builds only on a trusted list."""
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
