"""Smoke test of the installed package, run by .ci/run from outside the checkout with the wheel
installed in a fresh venv: what a user who did ``pip install stiefel-sct`` gets must import, train
a spectral layer, keep it orthonormal, and round-trip a spectral checkpoint."""

import pathlib
import sys
import tempfile
from importlib import metadata, resources

import torch
from torch import nn

import stiefel_sct
from stiefel_sct import SpectralAdam, is_stiefel, load_spectral, orthonormality_error, save_spectral, spectralize

here = pathlib.Path(stiefel_sct.__file__).resolve()
assert "site-packages" in here.parts, f"stiefel_sct imported from {here}, not from the installed wheel"
assert metadata.version("stiefel-sct") == stiefel_sct.__version__, "package metadata and __version__ disagree"
assert resources.files("stiefel_sct").joinpath("py.typed").is_file(), "py.typed missing from the wheel"
licences = [f for f in metadata.files("stiefel-sct") or [] if f.name in ("LICENSE", "NOTICE")]
assert len(licences) == 2, f"LICENSE and NOTICE must ship in the wheel's metadata, found {licences}"

torch.manual_seed(0)
model = spectralize(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)), rank=4)
opt = SpectralAdam(model.parameters(), lr=1e-2)
x = torch.randn(64, 16)
y = x[:, :1].sin()
losses = []
for _ in range(30):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))
assert losses[-1] < losses[0], f"no learning: {losses[0]:.4f} -> {losses[-1]:.4f}"
err = max(orthonormality_error(p) for p in model.parameters() if is_stiefel(p))
assert err < 1e-5, f"factors left the manifold: {err:.2e}"

with tempfile.TemporaryDirectory() as folder:
    save_spectral(model, folder)
    fresh = load_spectral(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)), folder)
    assert torch.equal(fresh(x), model(x)), "a reloaded spectral checkpoint computes something else"

print(f"stiefel_sct {stiefel_sct.__version__} from {here.parent} (Python {sys.version.split()[0]}, torch "
      f"{torch.__version__}): loss {losses[0]:.4f} -> {losses[-1]:.4f}, orthonormality {err:.1e}, checkpoint round trip ok")
