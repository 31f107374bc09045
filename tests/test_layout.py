"""Facts about the package's shape that a reader relies on (checked on the source, by ``ast``)."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "stiefel_sct"


def _imports(path):
    """``(module, names)`` of every ``from X import ...`` in a file (relative imports as ``.X``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or ""), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_the_optimizer_imports_no_layer():
    for name in ("optim.py", "optim_settings.py", "optim_state.py", "step_plan.py", "grad_checks.py",
                 "backward_step.py", "adam.py", "bank.py", "triples.py", "manifold.py"):
        for module, _ in _imports(PKG / name):
            assert "layers" not in module and "convert" not in module, (name, module)


def test_the_adam_kernels_know_no_manifold_and_no_bank():
    for name in ("adam.py", "quant.py"):
        for module, _ in _imports(PKG / name):
            # only torch, the standard library and the 8-bit moment codec (itself torch-only)
            assert not module.startswith(".") or module == ".quant", (name, module)
            assert "geoopt" not in module


def test_no_module_imports_another_modules_private_names():
    for path in PKG.glob("*.py"):
        for module, names in _imports(path):
            if module.startswith(".") or module.startswith("stiefel_sct"):
                private = [n for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
                assert not private, f"{path.name} imports {private} from {module}"


def test_one_place_decides_the_cholesky_qr_passes():
    users = [p.name for p in PKG.glob("*.py") if "cholesky_ex" in p.read_text()]
    assert users == ["manifold.py"]
    text = (PKG / "manifold.py").read_text()
    # defined once, read by its certified form _ONE_PASS_DELTA (twice) and once in cholqr_into
    assert text.count("_ONE_PASS_KAPPA") == 4
    assert text.count("_ONE_PASS_DELTA") == 2  # defined once, read once (in _certified_one_pass)


def test_a_step_reaches_the_adam_kernel_and_each_chunks_retraction_in_three_frames(monkeypatch):
    """``SpectralAdam.step -> run_plan -> kernel``: the step's bookkeeping is one loop (issue 28)."""
    import inspect

    import torch

    from stiefel_sct import SpectralAdam, SpectralLinear, bank, step_plan

    paths = {}

    def path() -> list:
        names = [f.function for f in inspect.stack()[2:]]  # above the wrapper and path() itself
        return list(reversed(names[: names.index("step") + 1]))

    real_kernel, real_chunk = step_plan.adam_kernel, bank.FactorBank.retract_chunk_

    def kernel(*args):
        k = real_kernel(*args)
        return lambda *a, **kw: paths.setdefault("adam", path() + ["kernel"]) and k(*a, **kw)

    def chunk(self, *args):
        paths.setdefault("retract_chunk_", path() + ["retract_chunk_"])
        return real_chunk(self, *args)

    monkeypatch.setattr(step_plan, "adam_kernel", kernel)
    monkeypatch.setattr(bank.FactorBank, "retract_chunk_", chunk)
    model = torch.nn.Sequential(*[SpectralLinear(16, 16, 4) for _ in range(3)])
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert paths == {"adam": ["step", "run_plan", "kernel"], "retract_chunk_": ["step", "run_plan", "retract_chunk_"]}
