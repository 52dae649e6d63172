"""The README's references and configs/default.yaml are generated: they must match the code."""

import json
from pathlib import Path

import yaml

from bincount import docs
from bincount.config import Settings, load_settings

ROOT = Path(__file__).parents[1]


def test_generated_references_are_current():
    reference = (ROOT / "docs" / "reference.md").read_text()
    assert "<!-- BEGIN GENERATED: cli -->" in reference and "<!-- BEGIN GENERATED: config -->" in reference
    assert "<!-- BEGIN GENERATED: commands -->" in (ROOT / "docs" / "architecture.md").read_text()
    for document in docs.documents(ROOT):
        text = document.read_text()
        assert docs.render_readme(text) == text, f"{document.relative_to(ROOT)} is stale: run `make docs`"


def test_the_readme_links_resolve():
    """The README is the short manual; its links into docs/ (and theirs back) must point at real files."""
    import re

    for document in docs.documents(ROOT):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text()):
            if "://" not in target:
                assert (document.parent / target).exists(), f"{document.name} links to missing {target}"


def test_default_yaml_is_current_and_spells_out_every_key():
    path = ROOT / "configs" / "default.yaml"
    assert path.read_text() == docs.default_yaml(), "configs/default.yaml is stale: run `make docs`"
    assert load_settings(path, environ={}) == Settings()
    data = yaml.safe_load(path.read_text())
    for key, _, description, _ in docs._fields(Settings):
        node = data
        for part in key.split("."):
            node = node[part]
        assert description, f"{key} has no description"


def test_readme_opens_with_install_and_test():
    text = (ROOT / "README.md").read_text()
    assert text.index("make install") < text.index("make test") < text.index("## ")


def test_result_schemas_are_current():
    folder = ROOT / "docs" / "schemas"
    current = docs.result_schemas()
    assert {"EvalResult.json", "PredictResult.json", "AuditResult.json", "FetchResult.json"} <= set(current)
    assert {p.name: p.read_text() for p in folder.glob("*.json")} == current, "docs/schemas is stale: run `make docs`"
    predict = json.loads(current["PredictResult.json"])
    assert set(predict["properties"]) == {"target", "predicted", "failed", "items"}  # no internal fields
