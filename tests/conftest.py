import pytest
import torch


def fit(model, opt, x, y, steps, after_step=None):
    """Full-batch MSE regression of ``y`` on ``x`` for ``steps`` optimizer steps (``after_step``
    runs after each); returns the first and the last loss."""
    import torch.nn.functional as F

    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def sine_mlp(seed=0):
    """The sine proof's MLP (1 -> 64 -> spectral 64 x 64, rank 16 -> 64 -> 1) and its data, sin on [-pi, pi]."""
    from torch import nn

    from stiefel_sct import SpectralLinear

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), SpectralLinear(64, 64, 16), nn.Tanh(), nn.Linear(64, 1))
    x = torch.linspace(-3.14159, 3.14159, 200).unsqueeze(1)
    return model, x, torch.sin(x)


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


def pytest_generate_tests(metafunc):
    """Tests marked ``cuda`` that take a ``device`` argument run on the CPU and, where one is
    available, on a CUDA device (``benchmarks/gpu.sh`` runs them on a GPU machine)."""
    if "device" in metafunc.fixturenames and metafunc.definition.get_closest_marker("cuda"):
        no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
        metafunc.parametrize("device", ["cpu", pytest.param("cuda", marks=no_gpu)])
