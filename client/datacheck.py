"""The site data check: what training would use, and what was left out and why.

The summary holds counts, distributions and reason codes. Quarantine examples are paths relative
to the site folder, for the site's own screen and files: the summary is never sent to the server.
No DICOM header value that identifies anyone is read into it (modality codes and image sizes only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.config import DataConfig
from common.data.errors import DataError
from common.data.site import SiteData, SiteProfile, load_site

EXAMPLES_PER_REASON = 3


def check_site(site_dir: Path, config: DataConfig, num_labels: int | None, layout: str = "auto",
               cache_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """The summary of a site, or ``usable: false`` with the error's code and message."""
    try:
        site = load_site(site_dir, config, num_labels, progress=progress, layout=layout, cache_dir=cache_dir)
    except DataError as exc:
        return {"site": site_dir.name, "usable": False, "error": {"code": exc.code, "message": str(exc)}}
    return summarise(site, site_dir.name)


def summarise(site: SiteData, name: str) -> dict[str, Any]:
    profile = site.profile or SiteProfile("unknown")
    labels = {}
    for j, label in enumerate(site.label_names):
        positives = site.labels[:, j] > 0.5
        labels[label] = {split: {"positive": int(positives[idx].sum()), "negative": int((~positives[idx]).sum())}
                         for split, idx in (("train", site.train_index), ("val", site.val_index),
                                            ("test", site.test_index))}
    by_reason: dict[str, list[str]] = {}
    for path, code in site.quarantine:
        by_reason.setdefault(code, []).append(path)
    return {
        "site": name,
        "usable": True,
        "layout": profile.layout,
        "studies": len(site.studies),
        "train_studies": int(len(site.train_index)),
        "val_studies": int(len(site.val_index)),
        "test_studies": int(len(site.test_index)),
        "patients": len(set(site.groups)),
        "series": profile.series,
        "image_files": profile.files,
        "images_used": int(site.mask.sum()),
        "labels": labels,
        "severity_targets": int(np.isfinite(site.targets).sum()),
        "biomech_features": int(site.biomech.shape[-1]) if site.biomech is not None else 0,
        "modalities": dict(profile.modalities.most_common()),
        "image_sizes": dict(profile.image_sizes.most_common()),
        "metadata": {k: dict(v.most_common()) for k, v in profile.info.items()},
        "skipped_studies": len(site.skipped),
        "quarantine": [{"reason": code, "count": len(paths), "examples": paths[:EXAMPLES_PER_REASON]}
                       for code, paths in sorted(by_reason.items())],
        "cache": {"hits": profile.cache_hits, "misses": profile.cache_misses},
    }
