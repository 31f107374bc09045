import json
import math
import os
import pathlib
import subprocess

import pytest
import torch

from experiments import common, memory_70b, mlp_proofs, reproduce
from paper import build as report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    common.atomic_write_json(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1}

    with pytest.raises(TypeError):  # not serialisable: fails before anything is written
        common.atomic_write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)  # fails after the temp file is written
    with pytest.raises(OSError, match="disk full"):
        common.atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_write_results_records_config_and_environment(tmp_path):
    path = common.write_results("demo", {"a": 1}, {"m": 2.0}, results_dir=tmp_path)
    data = json.loads(path.read_text())
    assert data["config"] == {"a": 1} and data["metrics"] == {"m": 2.0}
    for key in ("torch", "geoopt", "stiefel_sct", "cpu", "date", "torch_threads"):
        assert key in data["environment"]


@pytest.mark.parametrize("task", mlp_proofs.TASKS)
@pytest.mark.parametrize("method", mlp_proofs.METHODS)
def test_each_method_runs(task, method):
    cfg = mlp_proofs.Config(steps=20, curve_every=5)
    r = mlp_proofs.run_one(task, method, seed=0, lr=0.01, schedule="cosine", cfg=cfg)
    assert r["steps"] == 20 and len(r["curve"]) >= 4
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in r["curve"])
    if method == "dense":
        assert r["orthonormality_error"] is None and r["params"] == r["dense_params"]
    else:
        assert r["orthonormality_error"] < 1e-5
        assert r["ranks"] == ([1, 16, 1] if task == "sine" else [2, 16, 1])
        # rank 16 shrinks sine's 64x64 layer; XOR's 32x32 at rank 16 is no smaller (as in the paper)
        assert (r["params"] < r["dense_params"]) == (task == "sine")


def test_methods_learn():
    cfg = mlp_proofs.Config(steps=300)
    for method in mlp_proofs.METHODS:
        r = mlp_proofs.run_one("sine", method, seed=0, lr=0.01, schedule="constant", cfg=cfg)
        assert r["curve"][-1][1] < 0.5 * r["curve"][0][1], method  # the loss falls, DFA included
    r = mlp_proofs.run_one("xor", "sct", seed=0, lr=0.01, schedule="constant", cfg=cfg)
    assert r["metric"] == 1.0


def test_dfa_uses_feedback_not_backprop():
    x, y, sizes, act, loss_fn = mlp_proofs.make_task("sine")
    model = mlp_proofs.make_mlp(sizes, act)
    fb = mlp_proofs.make_feedback(sizes, torch.Generator().manual_seed(0))
    mlp_proofs.dfa_backward(model, x, y, loss_fn, fb)
    g1 = model[0].weight.grad.clone()
    model.zero_grad()
    mlp_proofs.dfa_backward(model, x, y, loss_fn, [2 * b for b in fb])
    assert torch.allclose(model[0].weight.grad, 2 * g1)  # hidden gradients scale with B
    model.zero_grad()
    loss_fn(model(x), y).backward()
    assert not torch.allclose(model[0].weight.grad, g1)  # and differ from backprop's


@pytest.fixture(scope="module")
def memory_results(tmp_path_factory):
    """The memory script end to end at 2 layers (two configurations, fresh processes)."""
    pytest.importorskip("transformers")
    results = tmp_path_factory.mktemp("results")
    metrics = memory_70b.main(["--preset", "smoke", "--layers", "2", "--configs", "reference", "ckpt_sib", "ckpt2_sib",
                               "--steps", "2", "--results-dir", str(results)])
    return results, metrics


@pytest.mark.slow
def test_memory_script_end_to_end(memory_results):
    _, metrics = memory_results
    ref, sib = metrics["summary"]["reference"], metrics["summary"]["ckpt_sib"]
    assert ref["layers"] == 2 and not ref["extrapolated"]
    assert ref["params"] == sib["params"] and ref["dense_params"] > 100 * ref["params"]
    assert ref["grad_mb_held"] > 0 and sib["grad_mb_held"] == 0  # step in backward holds no gradients
    assert ref["orthonormality_error"] < 1e-5 and sib["orthonormality_error"] < 1e-5
    nested = metrics["summary"]["ckpt2_sib"]
    assert nested["grad_mb_held"] == 0 and nested["orthonormality_error"] < 1e-5
    # same model, same batches: the levers change memory, not the computation
    by = {r["config"]: [s["loss"] for s in r["steps"]] for r in metrics["runs"]}
    assert by["ckpt2_sib"] == pytest.approx(by["reference"], rel=1e-5)
    losses = [s["loss"] for s in metrics["runs"][0]["steps"]]
    assert all(math.isfinite(v) for v in losses)
    rows = {r["shape"]: r for r in metrics["compression"]}
    assert rows["8192x28672"]["ratio"] == pytest.approx(199.1, abs=0.05)
    assert rows["8192x28672"]["measured_mb"] == pytest.approx(rows["8192x28672"]["sct_mb"], rel=1e-3)


def test_extrapolation_is_linear():
    runs = [{"layers": 4, "x": 10.0}, {"layers": 8, "x": 18.0}]
    assert memory_70b.extrapolate(runs, "x", 80) == pytest.approx(162.0)


@pytest.mark.slow
def test_report_builds_from_results_and_names_missing_file(tmp_path, memory_results, tiny_data, monkeypatch):
    from experiments import data as data_lib
    from experiments import rank_sweep

    results = memory_results[0]
    mlp_proofs.main(["--preset", "smoke", "--results-dir", str(results)])
    monkeypatch.setattr(data_lib, "prepare", lambda *a, **k: tiny_data)
    rank_sweep.main(["--preset", "smoke", "--stages", "lr", "main", "schedule", "ablation",
                     "--results-dir", str(results)])
    from experiments import compress_pretrained

    compress_pretrained.main(["--preset", "smoke", "--parts", "lm", "--results-dir", str(results)])
    pytest.importorskip("peft")
    from experiments import finetune_smollm2  # every registered experiment has a section: give it results

    finetune_smollm2.main(["--preset", "smoke", "--stages", "compare", "--methods", "dense", "sct_b50",
                           "--results-dir", str(results)])
    out = tmp_path / "paper"
    path = report.build(results, out)
    text = path.read_text()
    assert "| sine | final MSE |" in text and "| xor | accuracy |" in text
    assert "0.0768" in text and "85.5%" in text  # the paper's numbers beside ours
    assert "preset `smoke`" in text
    assert (out / "figures" / "mlp_proofs_curves.png").stat().st_size > 1000
    assert "LLaMA-3-70B" in text and "| ckpt_sib | 2 |" in text and "| 8192x28672 | 18.9 |" in text
    assert (out / "figures" / "memory_70b.png").stat().st_size > 1000
    assert "## Rank sweep" in text and "| r8 |" in text and "| r128 | 598M | 4.183 |" in text  # ours beside the paper's
    assert "ablation-r8-preserve" in text and "schedule-dense-wsd" in text
    assert "## Compressing pretrained models" in text and "| budget 0.5 | sct |" in text and "dense_continued" in text
    for fig in ("rank_sweep_curves.png", "rank_sweep_tradeoff.png", "rank_sweep_schedules.png", "compress_pretrained.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    with pytest.raises(report.MissingResults, match="mlp_proofs.json"):
        report.build(tmp_path / "empty", out)
    assert report.main(["--results", str(tmp_path / "empty"), "--out", str(out)]) == 2
    # beside the committed results: the report opens with both columns, each headed by its preset
    text = report.build(results, out, compare=ROOT / "results").read_text()
    assert "## This run beside the committed one" in text
    committed = json.loads((ROOT / "results" / "finetune_smollm2.json").read_text())
    dense = committed["metrics"]["table"]["compare/dense/main"]["val_loss_after"]
    row = next(line for line in text.splitlines() if "held-out after training: dense AdamW" in line)
    assert "(smoke," in row and f"| {dense:.4g} (" in row and f"({committed['config']['preset']}," in row


@pytest.mark.parametrize("segments", [None, 1, 2, 5])
def test_chunked_and_nested_loss_equal_the_models_loss(segments):
    """The LM head in checkpointed chunks, and (segments) the layers in checkpointed groups, each
    layer checkpointed inside: the same loss and gradients as the model's own forward."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if segments is not None:
        memory_70b.enable_layer_checkpointing(model)
    model.train()
    ids = torch.randint(0, 300, (2, 20))
    ref = model(input_ids=ids, labels=ids).loss
    params = [model.model.layers[0].mlp.up_proj.weight, model.model.layers[4].self_attn.q_proj.weight,
              model.model.embed_tokens.weight]
    ref_grads = torch.autograd.grad(ref, params)
    ours = memory_70b.chunked_causal_lm_loss(model, ids, chunk=7, segments=segments)
    assert torch.allclose(ours, ref, rtol=1e-6)
    for g, r in zip(torch.autograd.grad(ours, params), ref_grads):
        assert torch.allclose(g, r, atol=1e-7)


def test_reproduce_runs_what_the_report_reports():
    # one registry: reproduce.py cannot forget an experiment that paper/build.py needs
    assert reproduce.EXPERIMENTS is report.EXPERIMENTS
    names = [e.name for e in reproduce.EXPERIMENTS]
    assert "compress_pretrained" in names and len(set(names)) == len(names)
    for e in reproduce.EXPERIMENTS:
        assert (ROOT / "experiments" / f"{e.name}.py").is_file()
        assert all((ROOT / "results" / f"{r}.json").is_file() for r in e.results[:1])


def test_every_registered_experiment_is_rendered_or_the_build_fails_naming_it(tmp_path):
    """Issue 28: each experiment names its report section; an experiment without one stops the
    build before anything is written, naming the experiment."""
    import dataclasses

    assert {e.section for e in report.EXPERIMENTS} == set(report.SECTIONS)
    report.check_sections()
    ghost = dataclasses.replace(report.EXPERIMENTS[0], name="ghost", section="ghost_table")
    with pytest.raises(LookupError, match="experiment 'ghost' names report section 'ghost_table'"):
        report.check_sections(report.EXPERIMENTS + (ghost,))


@pytest.mark.parametrize("name", ["mlp_proofs", "memory_70b", "rank_sweep", "compress_pretrained"])
def test_every_experiment_has_the_reproduce_presets(name):
    module = __import__(f"experiments.{name}", fromlist=["PRESETS"])
    assert set(reproduce.PRESETS) <= set(module.PRESETS)


def _finetune_result(preset, dense, residual):
    table = {"compare/dense/main": {"val_loss_after": dense}}
    if residual is not None:
        table["compare/residual_r16/main"] = {"val_loss_after": residual}
    return {"config": {"preset": preset}, "environment": {"cpu": "Test CPU"}, "metrics": {"table": table}}


def test_side_by_side_puts_each_key_figure_beside_the_committed_one(tmp_path):
    (tmp_path / "finetune_smollm2.json").write_text(json.dumps(_finetune_result("cpu", 3.679, 3.705)))
    lines = report.side_by_side({"finetune_smollm2": _finetune_result("fast", 4.01, None)}, tmp_path)
    rows = {line.split(" | ")[1]: line for line in lines[2:]}
    dense = rows["SmolLM2 held-out after training: dense AdamW"]
    assert "(fast, Test CPU)" in dense and "| 4.01 | 3.679 (cpu, Test CPU) |" in dense
    assert rows["SmolLM2 held-out after training: SCT residual r=16"].endswith("| n/a | 3.705 |")  # not run here
    # a value whose run records another CPU than its file's (a --resume on another machine) names it
    committed = _finetune_result("cpu", 3.679, 3.705)
    committed["metrics"]["table"]["compare/dense/main"]["cpu"] = "Other CPU"
    committed["metrics"]["table"]["compare/residual_r16/main"]["cpu"] = "Test CPU"
    (tmp_path / "finetune_smollm2.json").write_text(json.dumps(committed))
    lines = report.side_by_side({"finetune_smollm2": _finetune_result("fast", 4.01, None)}, tmp_path)
    rows = {line.split(" | ")[1]: line for line in lines[2:]}
    assert "| 4.01 | 3.679 (on Other CPU) (cpu, Test CPU) |" in rows["SmolLM2 held-out after training: dense AdamW"]
    assert rows["SmolLM2 held-out after training: SCT residual r=16"].endswith("| n/a | 3.705 |")
    # no committed file for an experiment: its column says so instead of failing
    lines = report.side_by_side({"finetune_smollm2": _finetune_result("fast", 4.01, None)}, tmp_path / "none")
    assert lines[2].endswith("| 4.01 | n/a |")
    assert set(report.KEY_FIGURES) == {e.name for e in report.EXPERIMENTS}  # every experiment has key figures


def test_reproduce_writes_outside_the_committed_tables_by_default(tmp_path, monkeypatch):
    calls = []

    class Done:
        returncode = 0

    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd, cwd: calls.append(cmd) or Done())
    assert reproduce.main(["--preset", "fast", "--only", "mlp_proofs", "--out", str(tmp_path)]) == 0
    experiment, build = calls
    assert experiment[-2:] == ["--results-dir", str(tmp_path / "results")]
    assert build[build.index("--out") + 1] == str(tmp_path / "paper")
    assert build[build.index("--compare") + 1] == str(ROOT / "results")
    # a partial run still builds a whole report: the experiments not run come from the committed files
    assert (tmp_path / "results" / "rank_sweep.json").read_bytes() == (ROOT / "results" / "rank_sweep.json").read_bytes()
    assert not (tmp_path / "results" / "mlp_proofs.json").exists()
    calls.clear()
    assert reproduce.main(["--preset", "fast", "--no-report"]) == 0
    assert all(c[-1] == str(ROOT / "runs" / "reproduce" / "fast" / "results") for c in calls)
    calls.clear()
    assert reproduce.main(["--preset", "quick", "--no-report", "--out", str(ROOT)]) == 0  # the maintainers' refresh
    assert all(c[-1] == str(ROOT.resolve() / "results") for c in calls)


def test_progress_prints_a_line_per_item_when_stderr_is_not_a_terminal(capsys):
    assert list(common.progress(range(3), desc="demo")) == [0, 1, 2]
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(",")[0] for line in lines] == ["demo: 1/3 done", "demo: 2/3 done", "demo: 3/3 done"]


def test_with_tunable_adds_or_replaces_one_glibc_tunable():
    assert common.with_tunable("", "glibc.malloc.hugetlb=1") == "glibc.malloc.hugetlb=1"
    assert (common.with_tunable("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1")
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("name", ["ckpt2_sib", "ckpt2_sib_thp", "ckpt2_sib_compiled"])
def test_huge_page_configurations_reach_the_worker_environment(name, monkeypatch):
    """GLIBC_TUNABLES is read when a process starts: the setting must be in the worker's environment."""
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"ok": 1}\n', stderr="")

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setattr(memory_70b.subprocess, "run", fake_run)
    assert memory_70b.run_config(2, name, memory_70b.Config()) == {"ok": 1}
    huge = memory_70b.CONFIGS[name].get("huge_pages", False)
    assert ("glibc.malloc.hugetlb=1" in seen["GLIBC_TUNABLES"]) == huge
    assert "glibc.malloc.arena_max=4" in seen["GLIBC_TUNABLES"]  # the user's own tunables are kept
    assert (seen.get("THP_MEM_ALLOC_ENABLE") == "1") == huge
    assert seen["MALLOC_TRIM_THRESHOLD_"] == "131072"


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_eager_loss_and_gradients():
    """ckpt2_sib_compiled: the layers through torch.compile inside the nested checkpointing compute
    what the eager layers compute (spectral layers, step-in-backward's hooks not involved here)."""
    transformers = pytest.importorskip("transformers")
    from stiefel_sct import spectralize

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    spectralize(model, rank=8, embeddings=True)
    memory_70b.enable_layer_checkpointing(model)
    model.train()
    ids = torch.randint(0, 300, (2, 20))
    params = [p for p in model.parameters() if p.requires_grad]
    ref = memory_70b.chunked_causal_lm_loss(model, ids, chunk=7, segments=2)
    ref_grads = torch.autograd.grad(ref, params)
    memory_70b.compile_decoder_layers(model)
    for _ in range(2):  # the second call runs the cached graphs
        ours = memory_70b.chunked_causal_lm_loss(model, ids, chunk=7, segments=2)
        assert torch.allclose(ours, ref, rtol=1e-5)
        for g, r in zip(torch.autograd.grad(ours, params), ref_grads):
            assert torch.allclose(g, r, atol=1e-5, rtol=1e-4)
