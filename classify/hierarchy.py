"""Hierarchical classification: a classifier for the coarse level, then one per coarse group.

Probabilities multiply down the tree (P(species) = P(family) P(genus | family) P(species | genus)),
so the leaf distribution sums to one and every prediction is a path that exists in the taxonomy.
A group with a single child gets a constant predictor instead of a classifier (compare
``_ConstantPredictor`` in ``sklearn/multiclass.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
from penult.core.errors import PenultError
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class TaxonomyError(PenultError, ValueError):
    """A class is missing from the taxonomy, or the taxonomy is not a tree."""


def taxonomy_from_columns(
    leaf: Sequence[str], levels: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    """Leaf class -> ancestors (coarse first) from per-image label columns, checked to be a tree.

    ``levels`` maps column name -> per-image values, in coarse-to-fine order (e.g. family, genus).
    """
    names = list(levels)
    out: dict[str, tuple[str, ...]] = {}
    for i, c in enumerate(leaf):
        path = tuple(str(levels[n][i]) for n in names)
        if "" in path:
            missing = names[path.index("")]
            raise TaxonomyError(f"class {c!r} has no {missing!r} (image {i}); fix the taxonomy CSV")
        if out.setdefault(str(c), path) != path:
            raise TaxonomyError(
                f"class {c!r} sits under two paths: {' > '.join(out[str(c)])} and {' > '.join(path)}"
            )
    return out


def tree_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Levels up to the lowest common ancestor of two (n, depth) path arrays (0 = same leaf)."""
    same = np.cumprod(a == b, axis=1).sum(axis=1)
    return a.shape[1] - same


class _Constant(BaseEstimator):
    """The only child of a group: probability one, no training."""

    def fit(self, X, y=None) -> _Constant:
        self.classes_ = np.array([0])
        return self

    def predict_proba(self, X) -> np.ndarray:
        return np.ones((len(X), 1))


def _key(prefix: Sequence[object]) -> str:
    return json.dumps([str(p) for p in prefix])


class HierarchicalClassifier(ClassifierMixin, BaseEstimator):
    """Top-down classifier over a taxonomy.

    Parameters
    ----------
    estimator : classifier with ``predict_proba``, cloned for every group with several children
        (default: standardised logistic regression).
    taxonomy : mapping class -> tuple of ancestors, coarse first, all of one depth. ``None`` means
        no coarse levels (a flat classifier).
    level_names : names of the ancestor levels (e.g. ``("family", "genus")``), for reports.
    """

    def __init__(
        self,
        estimator: BaseEstimator | None = None,
        *,
        taxonomy: Mapping[str, Sequence[str]] | None = None,
        level_names: Sequence[str] | None = None,
    ):
        self.estimator = estimator
        self.taxonomy = taxonomy
        self.level_names = level_names

    def _paths(self, classes: np.ndarray) -> np.ndarray:
        tax = self.taxonomy or {}
        depths = {len(v) for v in tax.values()}
        if len(depths) > 1:
            raise TaxonomyError(f"taxonomy paths have different depths {sorted(depths)}")
        depth = depths.pop() if depths else 0
        rows = []
        for c in classes:
            key = c if c in tax else str(c)
            if self.taxonomy is not None and key not in tax:
                raise TaxonomyError(f"class {c!r} is not in the taxonomy")
            rows.append([*map(str, tax.get(key, ())), c])
        return np.array(rows, dtype=object).reshape(len(classes), depth + 1)

    def fit(self, X, y) -> HierarchicalClassifier:
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.paths_ = self._paths(self.classes_)
        depth = self.paths_.shape[1]
        names = list(self.level_names or [f"level{i}" for i in range(depth - 1)])
        if len(names) != depth - 1:
            raise TaxonomyError(f"{len(names)} level names for {depth - 1} coarse levels")
        self.levels_ = [*names, "class"]
        base = self.estimator if self.estimator is not None else _default_estimator()
        spaths = self.paths_.astype(str)
        self.nodes_: dict[str, BaseEstimator] = {}
        self.children_: dict[str, list[str]] = {}
        for level in range(depth):
            for prefix in sorted({tuple(p[:level]) for p in spaths}):
                under = np.all(spaths[:, :level] == np.array(prefix, dtype=str), axis=1)
                kids, child = np.unique(spaths[under, level], return_inverse=True)
                key = _key(prefix)
                self.children_[key] = kids.tolist()
                if len(kids) == 1:
                    self.nodes_[key] = _Constant().fit(X[:1])
                    continue
                rows = under[y_idx]
                pos = np.full(len(self.classes_), -1)
                pos[under] = child
                self.nodes_[key] = clone(base).fit(X[rows], pos[y_idx[rows]])
        return self

    def _leaf_proba(self, X) -> np.ndarray:
        n = len(X)
        prob: dict[tuple[str, ...], np.ndarray] = {(): np.ones(n)}
        for _ in range(self.paths_.shape[1]):
            nxt: dict[tuple[str, ...], np.ndarray] = {}
            for prefix, p in prob.items():
                key = _key(prefix)
                node, kids = self.nodes_[key], self.children_[key]
                cond = node.predict_proba(X)
                for j, c in enumerate(node.classes_):
                    nxt[(*prefix, kids[int(c)])] = p * cond[:, j]
            prob = nxt
        spaths = self.paths_.astype(str)
        return np.column_stack([prob[tuple(path)] for path in spaths])

    def predict_proba(self, X) -> np.ndarray:
        """(n, n_classes) leaf probabilities: products of the conditional probabilities on the path."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self._leaf_proba(X)

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_path(self, X) -> np.ndarray:
        """(n, depth) predicted paths, coarse first, leaf last: always a path of the taxonomy."""
        return self.paths_[np.argmax(self.predict_proba(X), axis=1)]

    def level_proba(self, X, level: int | str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, (n, n_labels) probabilities) summed over the leaves below each node of a level."""
        i = self.levels_.index(level) if isinstance(level, str) else level
        leaf = self.predict_proba(X)
        labels, inv = np.unique(self.paths_[:, i].astype(str), return_inverse=True)
        out = np.zeros((len(leaf), len(labels)))
        np.add.at(out.T, inv, leaf.T)
        return labels, out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags


def _default_estimator() -> BaseEstimator:
    from penult.classify.heads import make_head

    return make_head("lr")
