"""The compression experiment's pieces on tiny locally built models (no download)."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from experiments import compress_pretrained as cp  # noqa: E402
from experiments.common import LowRankLinear  # noqa: E402
from stiefel_sct import SpectralLinear  # noqa: E402


def _bert(dropout=0.0):
    torch.manual_seed(0)
    # a large init scale makes the encoder layers (not the embeddings) shape the output
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, initializer_range=0.3, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _batch():
    ids = torch.randint(1, 120, (6, 10))
    mask = torch.ones_like(ids)
    mask[3:, 7:] = 0  # padded tail
    return {"input_ids": ids, "attention_mask": mask}


def _targets(teacher, n):
    """``n`` fixed batches with the teacher's embeddings as targets, shaped as ``SentenceSet``."""

    class Targets:
        pass

    data = Targets()
    torch.manual_seed(1)
    with torch.no_grad():
        data.batches = [(b, cp.sentence_embeddings(teacher, b)) for b in (_batch() for _ in range(n))]
    return data


def test_low_rank_baseline_is_the_truncated_svd():
    lin = nn.Linear(20, 12)
    full = LowRankLinear.from_linear(lin, 12)
    x = torch.randn(5, 20)
    assert torch.allclose(full(x), lin(x), atol=1e-5)
    low = LowRankLinear.from_linear(lin, 4)
    assert sum(p.numel() for p in low.parameters()) == 4 * (20 + 12) + 12


def test_sentence_embeddings_ignore_padding_and_are_unit_norm():
    bert, batch = _bert(), _batch()
    emb = cp.sentence_embeddings(bert, batch)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(6), atol=1e-5)
    one = {k: v[3:4, :7] for k, v in batch.items()}  # the same sentence without its padding
    assert torch.allclose(cp.sentence_embeddings(bert, one)[0], emb[3], atol=1e-5)


@pytest.mark.parametrize("policy", [dict(energy=0.9), dict(budget_fraction=0.4)])
def test_sct_and_low_rank_conversions_use_the_same_ranks(policy):
    a, b = _bert(), _bert()
    ra = cp.convert(a, "sct", cp.BERT_ALL, **policy)
    rb = cp.convert(b, "lowrank", cp.BERT_ALL, **policy)
    assert ra["ranks_by_name"] == rb["ranks_by_name"] and ra["layers"] == 12
    n_sct = sum(isinstance(m, SpectralLinear) for m in a.modules())
    n_low = sum(isinstance(m, LowRankLinear) for m in b.modules())
    assert n_sct == n_low == ra["converted_layers"] > 0
    assert abs(ra["params_after"] - rb["params_after"]) <= sum(r or 0 for r in ra["ranks_by_name"].values())
    if "budget_fraction" in policy:
        assert ra["selected_params_after"] <= 0.4 * ra["selected_dense_params"]


@pytest.mark.parametrize("method", ["sct", "lowrank"])
def test_distillation_heals_toward_the_original(method):
    teacher = _bert()
    student = _bert()
    cp.convert(student, method, cp.BERT_ALL, budget_fraction=0.3)
    data = _targets(teacher, 4)
    before = cp.mean_cosine(student, data)
    assert before < 0.5  # the conversion really damaged the encoder
    cp.distill(student, method, data, steps=40, lr=3e-3)
    assert cp.mean_cosine(student, data) > 0.8


def test_distillation_fits_the_encoder_without_dropout():
    """The target is the original encoder in eval mode, so healing runs without dropout: its first
    loss is exactly 1 - cos of the student's eval-mode embeddings (dropout would make it a draw)."""
    teacher, student = _bert(dropout=0.5), _bert(dropout=0.5)
    cp.convert(student, "sct", cp.BERT_ALL, budget_fraction=0.5)
    data = _targets(teacher, 2)
    batch, target = data.batches[0]
    with torch.no_grad():
        first = 1 - (cp.sentence_embeddings(student.eval(), batch) * target).sum(-1).mean()
    student.train()
    losses = cp.distill(student, "sct", data, steps=2, lr=1e-3)
    assert losses[0] == pytest.approx(float(first), abs=1e-6)
    assert not student.training


@pytest.mark.parametrize("argv", [["--heal-lrs", "0"], ["--fisher-heal-lrs", "-0.001"], ["--budgets", "1.5"]])
def test_command_line_refuses_bad_values_before_any_work(argv, capsys):
    with pytest.raises(SystemExit):
        cp.main(["--preset", "smoke", *argv])
    err = capsys.readouterr().err
    assert ("must be > 0" in err) if "lrs" in argv[0] else ("--budgets must be in (0, 1)" in err)
