import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


WORDS = ("the king and queen of the realm spoke to the people of the city about war and peace love "
         "and honour while the fool sang in the hall and the night fell over the castle walls").split()


def synthetic_documents(n_docs=6, words=600, seed=0):
    """A small English-like corpus made here (the tests never download anything)."""
    import random

    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(words // 12)]
        docs.append((f"doc{d}", "\n".join(lines) + "\n"))
    return docs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Tokenized train/validation streams of the synthetic corpus (BPE vocabulary 300)."""
    pytest.importorskip("tokenizers")
    from experiments import data as data_lib

    cache = tmp_path_factory.mktemp("cache")
    return data_lib.prepare("synthetic", vocab_size=300, cache_dir=cache, documents=synthetic_documents())
