"""The README's quick start: an ordinary MLP, made spectral, trained with SpectralAdam."""
import torch
from torch import nn

from stiefel_sct import SpectralAdam, orthonormality_error, spectralize

torch.manual_seed(0)
x = torch.linspace(-3.14, 3.14, 256).unsqueeze(1)
y = torch.sin(3 * x)
model = nn.Sequential(nn.Linear(1, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
spectralize(model, rank=16)               # the 128x128 layer becomes V diag(s) U^T, rank 16
opt = SpectralAdam(model.parameters(), lr=1e-2)  # was: torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(2000):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()                            # Adam update + QR retraction of U and V
print(model[2])
print(f"final MSE {loss.item():.2e}, orthonormality error {orthonormality_error(model[2].U):.1e}")
