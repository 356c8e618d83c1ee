"""Shared fixtures: the bundled names split once per session, and small random problems."""

import os

import pytest
import torch

from handgrad import data

# The dojo's tests grade hundreds of files; under bubblewrap each starts a fresh interpreter (importing
# torch again: 3-10 s), so they run in the basic sandbox unless they name one (the sandbox's own tests,
# tests/test_dojo_sandbox*.py, ask for bubblewrap with sandbox="require").
os.environ.setdefault("HANDGRAD_DOJO_SANDBOX", "basic")

# The tests' tensors are tiny: one thread avoids contention on a shared 2-core machine (where two
# threads made small ops hundreds of times slower), as the CLI's --threads 1 default does.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def names_splits() -> data.Splits:
    words = data.read_words(data.default_data_path())
    return data.make_splits(words.items, block_size=3, seed=42)
