"""Token estimates: the character estimate calibrates itself from usage; the exact BPE count is opt-in."""

from __future__ import annotations

import pytest

from pipeline.api.tokens import TokenEstimator, encoding_name, estimate

PREFIX = [{"role": "system", "content": "Label the sentiment: positive, negative or neutral."}]


@pytest.mark.parametrize(
    ("model", "name"),
    [("gpt-4o-mini", "o200k_base"), ("gpt-4.1-nano", "o200k_base"), ("gpt-4", "cl100k_base"), ("llama-3-8b", None)],
)
def test_encoding_names(model: str, name: str | None) -> None:
    """OpenAI model families map to their BPE encoding; other models have none."""
    assert encoding_name(model) == name


def test_hangul_counts_about_a_token_a_character() -> None:
    """The character estimate treats Hangul as ~0.9 tokens a character and ASCII as ~0.25."""
    assert estimate("a" * 400) == 100
    assert 80 <= estimate("가" * 100) <= 100


def test_calibration_converges_on_the_reported_counts() -> None:
    """Feeding usage.prompt_tokens that are 30% above the estimate makes estimates 30% higher."""
    tokens = TokenEstimator("some-vllm-model", PREFIX)
    text = "a fairly ordinary review text " * 5
    raw = tokens.prompt_tokens(text)
    for _ in range(20):
        tokens.observe(text, round(raw * 1.3))
    assert tokens.prompt_tokens(text) == pytest.approx(raw * 1.3, rel=0.02)


def test_exact_counts_after_loading() -> None:
    """With bpe-openai loaded, prompt tokens are the encoding's count plus framing, not an estimate."""
    pytest.importorskip("bpe_openai")
    tokens = TokenEstimator("gpt-4o-mini", PREFIX)
    loader = tokens.load_exact()
    assert loader is not None
    loader.join(timeout=60)
    assert tokens.exact
    short, long = tokens.prompt_tokens("hi"), tokens.prompt_tokens("hi " * 100)
    assert long - short == 100
    assert TokenEstimator("llama-3-8b").load_exact() is None


def test_the_simulator_charges_with_the_clients_encoding_table() -> None:
    """One model→encoding table: the simulator counts with the encodings the client assumes."""
    from pipeline.simulator import tokens as simulator_tokens  # noqa: PLC0415 - the simulator is tested here

    assert simulator_tokens.encoding_name is encoding_name
