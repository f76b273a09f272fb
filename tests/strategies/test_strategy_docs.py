"""The strategy in docs/writing-a-strategy.md works when copied: import path, build, aggregate."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from strategies import build

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-strategy.md"


def test_doc_strategy_copied_into_a_module_builds_by_import_path(tmp_path, monkeypatch):
    # Prepare: the first python block, written out as a user's module
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 30
    (tmp_path / "tmpmod_fedge_doc.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tmpmod_fedge_doc", raising=False)
    rng = np.random.default_rng(0)
    ds = [{"w": rng.standard_normal(3) * scale} for scale in (5.0, 0.1, 3.0, 0.2)]
    # Execute
    s = build("tmpmod_fedge_doc:SmallestNormMean", clients_per_round=4, k=2)
    agg = s.aggregate(ds, np.full(4, 0.25))
    # Assert: the mean of the two smallest-norm deltas (clients 1 and 3)
    np.testing.assert_allclose(agg["w"], (ds[1]["w"] + ds[3]["w"]) / 2)
    assert s.weighted is False
    monkeypatch.delitem(sys.modules, "tmpmod_fedge_doc", raising=False)
