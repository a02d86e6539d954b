"""Fixtures of the safety tests."""

from __future__ import annotations

import pytest


@pytest.fixture()
def tokenizer_loads(monkeypatch) -> list:
    """The ``trust_remote_code`` value of every ``AutoTokenizer.from_pretrained`` call ("unset" if not passed)."""
    import transformers

    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "unset"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    return seen
