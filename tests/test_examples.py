import pathlib
import re
import runpy

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
