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


def test_every_module_has_an_api_page_in_the_docs():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    modules = sorted(p.stem for p in (root / "stiefel_sct").glob("*.py") if p.stem != "__init__")
    index = (root / "docs" / "index.md").read_text()
    for name in modules:
        page = root / "docs" / "api" / f"{name}.rst"
        assert page.is_file() and f".. automodule:: stiefel_sct.{name}" in page.read_text(), name
        assert f"api/{name}\n" in index, f"docs/index.md does not list api/{name}"


def test_version_is_in_the_changelog():
    import pathlib

    import stiefel_sct

    changelog = (pathlib.Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    assert f"## [{stiefel_sct.__version__}] - " in changelog
