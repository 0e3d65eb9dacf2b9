"""verdict.json: the schema is enforced, and the intervals are Student-t intervals of the mean."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from flatlit.analysis.verdict import above, check_verdict, group_intervals, mean_interval, write_verdict


def test_mean_interval_is_the_t_interval():
    x = [0.81, 0.84, 0.79, 0.86]
    iv = mean_interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert iv["mean"] == pytest.approx(np.mean(x)) and iv["n"] == 4
    assert (iv["low"], iv["high"]) == pytest.approx((lo, hi), rel=1e-12)
    assert mean_interval([2.0]) == {"mean": 2.0, "low": 2.0, "high": 2.0, "n": 1}
    assert above({"low": 1.1}, {"high": 1.0}) and not above({"low": 0.9}, {"high": 1.0})


def test_group_intervals_by_a_column():
    rows = [{"b": 32, "acc": 0.9}, {"b": 32, "acc": 0.8}, {"b": 1000, "acc": 0.7}, {"b": 1000, "acc": ""}]
    out = group_intervals(rows, "b", ["acc"])
    assert out["32"]["acc"]["mean"] == pytest.approx(0.85) and out["1000"]["acc"]["n"] == 1


def test_write_verdict_and_the_schema(tmp_path):
    fig = tmp_path / "f.png"
    fig.write_bytes(b"png")
    path = write_verdict(str(tmp_path), "c", "p", "partly", {"a": {"b": [1, 2.5, math.inf]}}, [str(fig)])
    record = json.load(open(path))
    assert record == {
        "claim": "c",
        "paper": "p",
        "verdict": "partly",
        "numbers": {"a": {"b": [1, 2.5, math.inf]}},
        "figures": ["f.png"],
    }
    bad = [
        ({**record, "verdict": "yes"}, "verdict must be one of"),
        ({k: v for k, v in record.items() if k != "paper"}, "keys must be"),
        ({**record, "numbers": {"x": object()}}, "is not a JSON number"),
        ({**record, "figures": "f.png"}, "figures must be a list"),
    ]
    for rec, message in bad:
        with pytest.raises(ValueError, match=message):
            check_verdict(rec)
