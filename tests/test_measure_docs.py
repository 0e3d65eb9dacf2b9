"""docs/measures.md and experiments/_base/measures.yaml are generated from the measure registry and stay in sync."""

import os

import yaml

from flatlit.cli.measure import describe
from flatlit.sharpness import get_measure, list_measures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_and_config_entries_match_the_registry():
    with open(os.path.join(ROOT, "docs", "measures.md")) as f:
        assert f.read() == describe("markdown"), (
            "regenerate: flatlit measure --list --format markdown > docs/measures.md"
        )
    with open(os.path.join(ROOT, "experiments", "_base", "measures.yaml")) as f:
        text = f.read()
    assert text == describe("yaml"), (
        "regenerate: flatlit measure --list --format yaml > experiments/_base/measures.yaml"
    )
    entries = {}
    for cb in yaml.safe_load(text):
        entries.update(cb["init_args"]["measures"])
    assert sorted(entries) == list_measures()
    for name, settings in entries.items():
        spec = get_measure(name)
        assert settings == spec.defaults
        assert "arXiv" in spec.doc or "Cost" in spec.doc or "cost" in spec.doc, name  # formula/paper/cost documented
