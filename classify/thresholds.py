"""Per-class thresholds (IFCB practice): below its class's threshold an image is unclassified.

The IFCB analysis code counts an image for its winning class only if the classifier's score
passes a threshold tuned for that class, so that a class's count is not padded with the doubtful
images of its neighbours. ``penult train --class-thresholds`` tunes one threshold per class on
the out-of-fold posteriors that also calibrate the counts: ``f1`` maximises the class's F1 (the
winner's posterior at or above the threshold counts as a prediction), ``precision:0.9`` takes
the lowest threshold whose precision reaches 0.9 (a class that never reaches it counts nothing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from penult.classify.quantify import OutOfFold
from penult.core.errors import OptionError

__all__ = ["NEVER", "parse_class_thresholds", "tune"]

NEVER = 1.0 + 1e-9  # above every posterior: the class is never counted


def parse_class_thresholds(text: str) -> str:
    """``f1`` or ``precision:P`` with P strictly between 0 and 1."""
    t = str(text).strip().lower()
    if t == "f1":
        return t
    kind, _, value = t.partition(":")
    try:
        p = float(value)
    except ValueError:
        p = float("nan")
    if kind != "precision" or not 0 < p < 1:
        raise OptionError(
            f"--class-thresholds {text!r}: 'f1' or 'precision:P' with P between 0 and 1 "
            "(e.g. precision:0.9)"
        )
    return f"precision:{p:g}"


def tune(oof: OutOfFold, rule: str) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Per class (``oof.classes`` order) the threshold ``rule`` picks on the out-of-fold
    posteriors, and what it gave there: precision, recall and the images counted."""
    post, truth = oof.posteriors, oof.truth
    winner = post.argmax(1)
    target = None if rule == "f1" else float(rule.split(":")[1])
    out = np.zeros(len(oof.classes))
    table: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(oof.classes):
        mine = winner == c
        s = post[mine, c]
        positive = truth[mine] == c
        total = int((truth == c).sum())
        order = np.argsort(-s, kind="stable")
        s, positive = s[order], positive[order]
        tp = np.cumsum(positive)
        k = np.arange(1, len(s) + 1)
        cut = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)  # between scores
        if target is None:
            score = np.where(cut, 2 * tp / (k + total), -1.0)
            i = int(np.argmax(score)) if len(s) else -1
        else:
            ok = np.flatnonzero(cut & (tp / k >= target))
            i = int(ok[-1]) if len(ok) else -1  # the lowest threshold that still reaches it
        out[c] = float(s[i]) if i >= 0 else (0.0 if target is None else NEVER)
        n = int(tp[i]) if i >= 0 else 0
        table[str(name)] = {
            "threshold": round(float(min(out[c], 1.0)), 6),
            "precision": round(n / (i + 1), 4) if i >= 0 else None,
            "recall": round(n / total, 4) if total else None,
            "counted": i + 1 if i >= 0 else 0,
        }
    return out, table
