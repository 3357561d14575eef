"""Shared fixtures: a private NANOCHAT_BASE_DIR per test, a small deterministic corpus and a tiny trained tokenizer."""

import random

import pytest

from nanochat.tokenizer import RustBPETokenizer

WORDS = ("the of and to in is was that for on with as by at from his her they this which be or an are had not "
         "river stone light garden winter letter window market silver morning quiet bright early seven "
         "thousand question answer because between through under again never always Ünïcödé café naïve").split()


def make_docs(n, seed=0, min_words=5, max_words=300):
    """Documents 'docNNNNN <words> END.' with a unique marker up front and a fixed end, of varied lengths."""
    rng = random.Random(seed)
    return [f"doc{i:05d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + " END."
            for i in range(n)]


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    path = tmp_path / "nanochat_base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return RustBPETokenizer.train_from_iterator(iter(make_docs(400, seed=1)), 400)
