"""The language-model pipeline: data, tokenizer, schedules, a few real training steps, resume."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from experiments import data as data_lib
from experiments import rank_sweep


def _documents(n_docs=6):
    from conftest import synthetic_documents

    return synthetic_documents(n_docs)


def test_strip_gutenberg_keeps_only_the_body():
    text = ("The Project Gutenberg EBook of Hamlet\r\nlicence words\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nACT I\r\nWho's there?\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n")
    assert data_lib.strip_gutenberg(text) == "ACT I\nWho's there?\n"
    assert data_lib.strip_gutenberg("no markers\n") == "no markers\n"


def test_split_holds_out_whole_documents_or_the_tail():
    docs = [(f"d{i}", f"text {i}") for i in range(25)]
    train, val = data_lib.split_documents(docs)
    assert [n for n, _ in val] == ["d0", "d10", "d20"] and len(train) == 22
    assert not {n for n, _ in train} & {n for n, _ in val}
    (_, tt), (vn, vt) = *data_lib.split_documents([("one", "x" * 100)])[0], *data_lib.split_documents([("one", "x" * 100)])[1]
    assert len(tt) == 90 and len(vt) == 10 and vn == "one[val]"
    with pytest.raises(ValueError, match="every"):
        data_lib.split_documents(docs, every=1)


def test_tokenizer_round_trips_and_is_cached(tmp_path):
    texts = [t for _, t in _documents(3)]
    tok = data_lib.train_tokenizer(texts, 300, tmp_path)
    assert tok.get_vocab_size() == 300 and tok.token_to_id(data_lib.EOS) == 0
    sample = "The king spoke of peace, and the fool sang!"
    assert tok.decode(tok.encode(sample).ids) == sample  # byte-level: lossless, even for unseen words
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 1
    again = data_lib.train_tokenizer(texts, 300, tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        data_lib.train_tokenizer(texts, 100, tmp_path)


def test_token_data_batches(tiny_data):
    d = tiny_data
    assert d.vocab_size == 300 and d.info["val_documents"] == ["doc0"]
    assert int(d.train.max()) < 300 and (d.train == 0).sum() == 5  # one EOS per training document
    gen = torch.Generator().manual_seed(0)
    b = d.batch(4, 16, gen)
    assert b.shape == (4, 17) and b.dtype == torch.long
    val = d.val_batches(4, 16, 3)
    assert len(val) <= 3 and all(v.shape[1] == 17 for v in val)
    assert torch.equal(torch.cat(val).flatten(), d.val[: sum(v.numel() for v in val)])  # fixed, in order
    with pytest.raises(ValueError, match="too long"):
        d.batch(1, 10 ** 7, gen)


def test_schedules():
    f = rank_sweep.lr_factor
    assert f(0, 100, "cosine", 10) == pytest.approx(0.1) and f(9, 100, "cosine", 10) == 1.0
    assert f(99, 100, "cosine", 10) == pytest.approx(0.1, abs=1e-3)
    assert f(50, 100, "constant", 10) == 1.0
    assert f(79, 100, "wsd", 10) == 1.0 and f(90, 100, "wsd", 10) == pytest.approx(0.5) and f(99, 100, "wsd", 10) < 0.06
    with pytest.raises(ValueError, match="schedule"):
        f(50, 100, "linear", 10)


def _cfg(**kw):
    base = dict(rank_sweep.PRESETS["smoke"], ranks=[8], steps=6, batch=2, seq=16, eval_every=3, eval_batches=2,
                ckpt_every=100)
    base.update(kw)
    return rank_sweep.Config(preset="smoke", **base)


@pytest.mark.parametrize("rank", [None, 8])
def test_three_steps_dense_and_spectral(tmp_path, tiny_data, rank):
    cfg = _cfg(steps=3)
    run = rank_sweep.Run("t", "main", rank, 3e-3, 3, "cosine")
    rec = rank_sweep.train_run(run, cfg, tiny_data, tmp_path)
    assert math.isfinite(rec["val_loss"]) and rec["val_ppl"] == pytest.approx(math.exp(rec["val_loss"]))
    assert rec["curve"]["eval_step"] == [0, 3] and rec["tokens_per_s"] > 0 and rec["params"] > 0
    if rank is None:
        assert rec["compression"] == 1.0 and rec["orthonormality_error"] is None
    else:
        assert rec["converted"]["layers"] == 7 and rec["compression"] > 10
        assert rec["orthonormality_error"] < 1e-5


def test_spectral_init_matches_the_dense_weight_scale(tiny_data):
    cfg = _cfg()
    dense, _ = rank_sweep.build_model(cfg, tiny_data.vocab_size, None)
    spectral, _ = rank_sweep.build_model(cfg, tiny_data.vocab_size, 8)
    w_dense = dense.model.layers[0].mlp.up_proj.weight
    w_spec = spectral.model.layers[0].mlp.up_proj.dense_weight()
    assert w_spec.norm().item() == pytest.approx(w_dense.norm().item(), rel=0.05)


@pytest.mark.parametrize("preserve, adaptive", [(False, False), (True, False), (False, True)],
                         ids=["plain", "preserve", "adaptive"])
def test_resume_gives_the_uninterrupted_result(tmp_path, tiny_data, preserve, adaptive):
    cfg = _cfg(ckpt_every=2, adaptive_every=2, adaptive_grow=2, adaptive_budget_rank=8, adaptive_tol=0.02)
    run = rank_sweep.Run("r", "adaptive" if adaptive else "main", 4 if adaptive else 8, 3e-3, 6, "cosine",
                         preserve_function=preserve, adaptive=adaptive)
    full = rank_sweep.train_run(run, cfg, tiny_data, tmp_path / "a")
    if adaptive:  # the ranks moved before the break (step 2), so the resume must rebuild them
        assert full["rank_changes"] and full["rank_changes"][0]["step"] == 2
        assert full["curve"]["ranks"][0] == {t: 4.0 for t in full["curve"]["ranks"][0]}
        assert full["curve"]["ranks"][-1] != full["curve"]["ranks"][0]
        budget = rank_sweep.rank_budget(rank_sweep.build_model(cfg, tiny_data.vocab_size, 8)[0], 8)
        assert full["converted"]["spectral_params"] <= budget
    assert rank_sweep.train_run(run, cfg, tiny_data, tmp_path / "b", stop_after=3) == {}
    blob = torch.load(tmp_path / "b" / "r.pt", weights_only=True)
    assert blob["step"] == 3 and blob["format"] == rank_sweep.CKPT_FORMAT
    resumed = rank_sweep.train_run(run, cfg, tiny_data, tmp_path / "b", resume=True)
    assert resumed["curve"] == full["curve"]  # every evaluation, before and after the break, identical
    a = torch.load(tmp_path / "a" / "r.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "r.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_run_or_format_is_rejected(tmp_path, tiny_data):
    cfg = _cfg(steps=2)
    run = rank_sweep.Run("x", "main", None, 1e-3, 2, "cosine")
    rank_sweep.train_run(run, cfg, tiny_data, tmp_path)
    other = rank_sweep.Run("x", "main", None, 2e-3, 2, "cosine")
    with pytest.raises(RuntimeError, match="another run"):
        rank_sweep.train_run(other, cfg, tiny_data, tmp_path, resume=True)
    blob = torch.load(tmp_path / "x.pt", weights_only=True)
    blob["format"] = 0
    torch.save(blob, tmp_path / "x.pt")
    with pytest.raises(RuntimeError, match="format 0"):
        rank_sweep.train_run(run, cfg, tiny_data, tmp_path, resume=True)


def test_sweep_end_to_end_picks_lrs_and_resumes(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(data_lib, "prepare", lambda *a, **k: tiny_data)
    args = ["--preset", "smoke", "--stages", "lr", "main", "--steps", "2", "--results-dir", str(tmp_path / "results")]
    metrics = rank_sweep.main(args)
    assert set(metrics["table"]) == {"dense", "r8"} and set(metrics["best_lr"]) == {"dense", "r8"}
    saved = json.loads((tmp_path / "results" / "rank_sweep.json").read_text())
    assert saved["metrics"]["table"]["r8"]["gap_equal_steps"] == pytest.approx(metrics["table"]["r8"]["gap_equal_steps"])
    again = rank_sweep.main(args + ["--resume"])  # everything finished: nothing retrained, same table
    assert again["table"] == metrics["table"]
    with pytest.raises(RuntimeError, match="another configuration"):
        rank_sweep.main(args[:-2] + ["--steps", "3", "--results-dir", str(tmp_path / "results"), "--resume"])


def test_equal_time_comparison_interpolates_the_slower_curve():
    fast = {"stage": "main", "name": "main-r8", "wall_s": 10.0, "steps": 100, "val_loss": 4.0,
            "curve": {"eval_step": [0, 50, 100], "val_loss": [8.0, 5.0, 4.0]}}
    slow = {"stage": "main", "name": "main-dense", "wall_s": 40.0, "steps": 100, "val_loss": 3.0,
            "curve": {"eval_step": [0, 50, 100], "val_loss": [8.0, 4.0, 3.0]}}
    # after 10 s the dense run is at step 25: halfway from 8.0 to 4.0
    assert rank_sweep._loss_at_time(slow, 10.0) == pytest.approx(6.0)
    assert rank_sweep._loss_at_time(fast, 10.0) == 4.0 and rank_sweep._loss_at_time(fast, 99.0) == 4.0
    for r in (fast, slow):
        r.update({k: 0.0 for k in ("lr", "val_ppl", "train_loss", "params", "compression", "step_s", "tokens_per_s",
                                   "peak_rss_mb", "orthonormality_error")})
    table = rank_sweep.summarise({"a": fast, "b": slow}, rank_sweep.Config())
    assert table["r8"]["gap_equal_steps"] == pytest.approx(4.0 / 3.0 - 1)
    assert table["r8"]["gap_equal_time"] == pytest.approx(4.0 / 6.0 - 1) and table["r8"]["equal_time_s"] == 10.0
