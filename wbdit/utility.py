"""Downstream utility: do generated cells of a rare cell type help a classifier find it in real cells?

The seed paper's own "next check". For each cell type with at least ``UTILITY_MIN_TRAIN``
training cells and ``UTILITY_MIN_TEST`` held-out real cells:

1. the real training cells with that type cut down to ``UTILITY_FEW`` random cells train a
   cell-type classifier; its F1 for that type on the held-out real cells is ``utility_f1_cut``;
2. the cut cells are replaced by as many cells of that type from the compared side
   (generated cells, a baseline; all of them if it has fewer): F1 ``utility_f1``;
3. the same with the type's real training cells restored, i.e. the full training set:
   ``utility_f1_real``, what real cells achieve (the floor column's ``utility_f1``).

``utility_f1`` near ``utility_f1_real`` means the generated cells stand in for real ones; at or
below ``utility_f1_cut`` they add nothing (or mislead). The classifier is a logistic regression
on standardized features (the evaluator passes PCA coordinates, see ``wbdit.evaluation``);
F1 is the one-vs-rest F1 of the cut type among the multi-class predictions. Overall values
are means over the scored types.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

UTILITY_FEW = 5  # training cells the cut-down type keeps
UTILITY_MIN_TRAIN = 20  # a type needs this many training cells to be cut down
UTILITY_MIN_TEST = 5  # ... and this many held-out real cells to be scored
MAX_ITER = 1000


def _f1_per_type(train_x, train_y, test_x, test_y, types) -> dict[str, float]:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITER))
    pred = model.fit(train_x, train_y).predict(test_x)
    return {t: float(f1_score(test_y == t, pred == t, zero_division=0.0)) for t in types}


class DownstreamUtility:
    """The utility experiment for one training set and one held-out set (module docstring).

    train_x, test_x: cells x features (same feature space); train_y, test_y: cell types (str).
    The cut-down training sets and their F1 are computed once here; ``score`` adds one
    side's cells. Types: the scored types, sorted.
    """

    def __init__(
        self,
        train_x: np.ndarray,
        train_y: np.ndarray,
        test_x: np.ndarray,
        test_y: np.ndarray,
        seed: int = 0,
        few: int = UTILITY_FEW,
    ):
        self.train_x, self.train_y = train_x, np.asarray(train_y).astype(str)
        self.test_x, self.test_y = test_x, np.asarray(test_y).astype(str)
        self.seed, self.few = seed, few
        n_train = {t: int((self.train_y == t).sum()) for t in np.unique(self.train_y)}
        self.types = sorted(
            t for t, n in n_train.items() if n >= UTILITY_MIN_TRAIN and (self.test_y == t).sum() >= UTILITY_MIN_TEST
        )
        if len(n_train) < 2:
            self.types = []  # one class: nothing to classify
        rng = np.random.default_rng(seed)
        self.kept: dict[str, np.ndarray] = {}
        for t in self.types:
            rows = np.flatnonzero(self.train_y == t)
            drop = rng.choice(rows, size=len(rows) - few, replace=False)
            self.kept[t] = np.setdiff1d(np.arange(len(self.train_y)), drop)
        self.f1_real = _f1_per_type(train_x, self.train_y, test_x, self.test_y, self.types) if self.types else {}
        self.f1_cut = {t: self._f1(t, self.kept[t], None) for t in self.types}

    def _f1(self, t: str, kept: np.ndarray, added: np.ndarray | None) -> float:
        x, y = self.train_x[kept], self.train_y[kept]
        if added is not None and len(added):
            x, y = np.vstack([x, added]), np.concatenate([y, np.full(len(added), t)])
        return _f1_per_type(x, y, self.test_x, self.test_y, [t])[t]

    def n_removed(self, t: str) -> int:
        return int((self.train_y == t).sum()) - self.few

    def score(self, x: np.ndarray, y: np.ndarray) -> dict[str, dict]:
        """Per scored type: ``utility_f1`` with up to ``n_removed`` of the side's cells of that type added
        (None where the side has none), next to ``utility_f1_cut`` and ``utility_f1_real``."""
        y = np.asarray(y).astype(str)
        rng = np.random.default_rng(self.seed + 1)
        out = {}
        for t in self.types:
            rows = np.flatnonzero(y == t)
            f1 = None
            if len(rows):
                pick = rows if len(rows) <= self.n_removed(t) else rng.choice(rows, self.n_removed(t), replace=False)
                f1 = self._f1(t, self.kept[t], x[pick])
            out[t] = dict(utility_f1=f1, utility_f1_cut=self.f1_cut[t], utility_f1_real=self.f1_real[t])
        return out

    def floor(self) -> dict[str, dict]:
        """What real cells achieve: ``utility_f1`` = F1 with the type's real training cells restored."""
        return {
            t: dict(utility_f1=self.f1_real[t], utility_f1_cut=self.f1_cut[t], utility_f1_real=self.f1_real[t])
            for t in self.types
        }
