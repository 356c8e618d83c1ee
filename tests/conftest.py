"""Shared fixtures: the bundled names split once per session, and small random problems."""

import pytest
import torch

from handgrad import data

# The tests' tensors are tiny: one thread avoids contention on a shared 2-core machine (where two
# threads made small ops hundreds of times slower), as the CLI's --threads 1 default does.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def names_splits() -> data.Splits:
    words = data.read_words(data.default_data_path())
    return data.make_splits(words.items, block_size=3, seed=42)
