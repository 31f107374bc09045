import subprocess
import sys

import pytest

EXPERIMENT_ONLY = ["transformers", "tokenizers", "datasets", "matplotlib", "tqdm", "safetensors"]


def _imported_after(code):
    probe = f"import sys; {code}; print(','.join(m for m in {EXPERIMENT_ONLY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(filter(None, out.stdout.strip().split(",")))


@pytest.mark.slow
def test_import_does_not_pull_experiment_packages():
    # geoopt itself imports tqdm; anything beyond what torch + geoopt bring in would be ours
    baseline = _imported_after("import torch, geoopt")
    ours = _imported_after("import stiefel_sct")
    assert ours <= baseline, f"import stiefel_sct imported {sorted(ours - baseline)}"


def test_public_api():
    import stiefel_sct

    for name in stiefel_sct.__all__:
        assert hasattr(stiefel_sct, name), name
    assert stiefel_sct.__version__
