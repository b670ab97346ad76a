"""The clusters page of `penult serve` (issue 32, part 5): HDBSCAN clusters of the store's
unlabelled images and grow proposals for one class, both from ``classify.clusters``.

The clusters are made once (seconds) and kept until the user asks for new ones: naming one
cluster must not renumber the others while they are being looked at. Each cluster shows only
its members that are still open (unlabelled or predicted), from most to least typical; a cluster
skipped as mixed is hidden until the next clustering. Nothing here writes except through
``features.review`` (one journal commit per action).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from penult.classify.clusters import ClusterSet, Proposal, find_clusters, grow, is_open, spread
from penult.classify.web.site import Site, SiteError
from penult.features import review

__all__ = ["CLUSTERS_PAGE", "GROW", "SHOW", "ClusterBoard"]

CLUSTERS_PAGE = 10  # clusters on one page
SHOW = 30  # members a cluster shows, from most to least typical
GROW = 20  # images a grow proposal shows (default)


class ClusterBoard:
    """The clustering shown on the page, and what was done with it since it was made."""

    def __init__(self, store: Path, backbone: str, level: str = "label"):
        self.store, self.backbone, self.level = store, backbone, level
        self.sets: ClusterSet | None = None
        self.skipped: set[int] = set()  # cluster numbers (1 = largest) skipped as mixed
        self._lock = threading.Lock()

    def ensure(self) -> ClusterSet:
        with self._lock:
            if self.sets is None:
                self.sets = find_clusters(self.store, level=self.level, backbone=self.backbone)
            return self.sets

    def recluster(self) -> None:
        with self._lock:
            self.sets, self.skipped = None, set()

    def members(self, site: Site, number: int) -> list[str]:
        """Cluster ``number``'s members still open, most typical first."""
        cs = self.ensure()
        if not 1 <= number <= len(cs.members):
            raise SiteError(f"no cluster {number} (there are {len(cs.members)}; recluster?)")
        return self._still_open(site, cs, number - 1)[0]

    def _still_open(self, site: Site, cs: ClusterSet, k: int) -> tuple[list[str], np.ndarray]:
        """Cluster k's members (and rows) with no validated or dubious label yet."""
        rows = cs.rows[k]
        if site.has(self.level):
            keep = is_open(site.review_arrays(self.level)["status"][rows])
        else:
            keep = np.ones(len(rows), bool)
        return [p for p, ok in zip(cs.members[k], keep, strict=True) if ok], rows[keep]

    def cards(self, site: Site) -> tuple[list[dict[str, Any]], ClusterSet]:
        """Every cluster with open members and not skipped, largest first as made: its number,
        open members' count and ``SHOW`` of them from most to least typical, described."""
        cs = self.ensure()
        out = []
        for k, paths in enumerate(cs.members, 1):
            if k in self.skipped:
                continue
            left, rows = self._still_open(site, cs, k - 1)
            if left:
                shown = site.describe_rows(spread(list(rows), SHOW))
                out.append({"number": k, "size": len(left), "made": len(paths), "shown": shown})
        return out, cs

    def proposal(self, label: str, n: int = GROW) -> Proposal:
        return grow(self.store, label, n=n, level=self.level, backbone=self.backbone)

    def name(self, members: list[str], to: str) -> dict[str, Any]:
        """Label ``members`` (a cluster's open ones) ``to``: one action, one journal commit
        (the server's Publisher publishes it)."""
        b = review.move(self.store, members, to, level=self.level, publish=False)
        return {"action": f"named {len(members)} images {to!r}", "changed": b.changed,
                "skipped": b.skipped}  # fmt: skip

    def growable(self, site: Site) -> list[str]:
        """Classes with validated images (those a proposal can start from), most first."""
        if not site.has(self.level):
            return []
        return [c["label"] for c in site.review_counts(self.level) if c["validated"]]
