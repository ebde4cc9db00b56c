"""Listing a site's files the same way in every layout.

Hidden files and folders (a name starting with '.') are not data: macOS leaves ``._image1.png``
AppleDouble files and ``.DS_Store`` beside every copied file, and editors and sync tools leave
their own. They are ignored and never counted. A symbolic link whose target is missing is listed
separately, so that the site's quarantine table shows it (``broken-link``) instead of the file
silently vanishing.
"""

from __future__ import annotations

from pathlib import Path


def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_files(folder: Path, suffixes: set[str], recursive: bool = True) -> tuple[list[Path], list[Path]]:
    """(files with one of ``suffixes`` (lower case, e.g. {'.dcm'}), broken links), both sorted;
    hidden entries are left out."""
    if not folder.is_dir():
        return [], []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files, broken = [], []
    for path in candidates:
        if is_hidden(path, folder) or path.suffix.lower() not in suffixes:
            continue
        if path.is_symlink() and not path.exists():
            broken.append(path)
        elif path.is_file():
            files.append(path)
    return sorted(files), sorted(broken)


def list_folders(folder: Path, pattern: str = "*") -> list[Path]:
    """Sub-folders matching ``pattern`` (may span levels, e.g. 'XR_*/*/*'), hidden ones left out."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if p.is_dir() and not is_hidden(p, folder))
