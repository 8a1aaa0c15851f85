"""Task files: the shipped ones load, and each mistake names the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.task.config import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "instructions": "Label it.",
    "labels": {"yes": "it is", "no": "it is not"},
}


@pytest.mark.parametrize("name", ["sentiment.toml", "topics.toml"])
def test_shipped_configs_load(name: str) -> None:
    """Every config in configs/ is valid and has at least two labels."""
    config = load_config(ROOT / "configs" / name)
    assert len(config.labels) >= 2
    assert config.instructions


def test_topics_config_builds_text_from_a_template() -> None:
    """A template names the columns the text is built from, in order."""
    config = load_config(ROOT / "configs" / "topics.toml")
    assert config.multi_label
    assert config.template_columns == ("subject", "body")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": {"only": "one"}}, "at least two labels"),
        ({"labels": ["a", "b"]}, "[labels] must be a table"),
        ({"labels": {"yes": "", "no": "x"}}, "needs a one-line description"),
        ({"labels": {"Yes": "a", "yes": "b"}}, "differ only in case"),
        ({"instructions": None}, "missing required key 'instructions'"),
        ({"colour": "blue"}, "unknown key 'colour' in top level"),
        ({"input": {"txt_column": "x"}}, "unknown key 'txt_column' in [input]"),
        ({"input": {"carry": ["label"]}}, "clashes with an output field"),
        ({"input": {"carry": ["truncated"]}}, "clashes with an output field"),
        ({"input": {"max_chars": 0}}, "'max_chars' must be an integer ≥ 1"),
        ({"input": {"template": "{0} and {}"}}, "positional fields"),
        ({"model": {"temperature": 3}}, "temperature must be a number from 0 to 2"),
        ({"multi_label": "yes"}, "'multi_label' must be true or false"),
        ({"examples": [{"text": "x", "label": "maybe"}]}, "allowed labels are ['yes', 'no']"),
        ({"examples": [{"text": "x", "labels": ["yes", "no"]}]}, "multi_label is false"),
    ],
)
def test_invalid_config_names_the_problem(change: dict[str, object], message: str) -> None:
    """An invalid task file raises ConfigError whose message names the key and what is allowed."""
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, source="task.toml")
    assert message in caught.value.message
    assert caught.value.message.startswith("task.toml:")


def test_missing_and_broken_files_are_config_errors(tmp_path: Path) -> None:
    """A missing file or invalid TOML is a ConfigError that says which file."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("labels = {", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_fingerprint_follows_the_prompt_not_the_model() -> None:
    """Changing instructions or labels changes the prompt fingerprint; changing the model does not."""
    base = parse_config(BASE)
    assert base.with_overrides(model="gpt-4o").prompt_fingerprint() == base.prompt_fingerprint()
    other = parse_config({**BASE, "instructions": "Label it carefully."})
    assert other.prompt_fingerprint() != base.prompt_fingerprint()
    more = parse_config({**BASE, "labels": {"yes": "it is", "no": "it is not", "maybe": "unsure"}})
    assert more.prompt_fingerprint() != base.prompt_fingerprint()
