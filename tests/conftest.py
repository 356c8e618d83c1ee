"""Shared fixtures: the bundled names split once per session, and small random problems."""

import pytest

from handgrad import data


@pytest.fixture(scope="session")
def names_splits() -> data.Splits:
    words = data.read_words(data.default_data_path())
    return data.make_splits(words.items, block_size=3, seed=42)
