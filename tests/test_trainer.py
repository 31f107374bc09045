"""SpectralAdam under transformers.Trainer: gradient accumulation, clipping, Trainer's own
checkpoints and resume (the spectral structure rebuilt from checkpoint-N/spectral)."""

import os

import pytest
import torch

from stiefel_sct import SpectralAdam, is_stiefel, load_spectral, orthonormality_error, spectralize

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from test_checkpoint import tiny_llama  # noqa: E402

from stiefel_sct.hf import SpectralCheckpointCallback  # noqa: E402

pytestmark = pytest.mark.slow


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, seq=12, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 96, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _trainer(model, out, extra_callbacks=(), step_in_backward=False):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_grad_norm=0.5, learning_rate=1e-2, save_strategy="steps", save_steps=3, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    opt = SpectralAdam(model.parameters(), lr=1e-2, step_in_backward=step_in_backward)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 6)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched),
                                callbacks=[SpectralCheckpointCallback(), *extra_callbacks])


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _model(seed=0):
    model = tiny_llama(seed=seed).train()
    spectralize(model, energy=0.8)  # per-layer ranks: a fresh dense model cannot guess them
    return model


def test_trainer_resumes_a_spectral_run_to_the_same_losses(tmp_path):
    straight = _model()
    t = _trainer(straight, tmp_path / "straight")
    t.train()
    full = _losses(t)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]

    first = _trainer(_model(), tmp_path / "cut", [StopAt(3)])
    first.train()
    assert sorted(_losses(first)) == [1, 2, 3]
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert (ckpt / "spectral" / "spectral_config.json").is_file() and (ckpt / "optimizer.pt").is_file()

    # a new process would start from the dense architecture: rebuild the spectral model from the checkpoint
    resumed_model = load_spectral(tiny_llama(seed=7).train(), ckpt / "spectral")
    second = _trainer(resumed_model, tmp_path / "cut")
    second.train(resume_from_checkpoint=str(ckpt))
    resumed = _losses(second)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    for p in resumed_model.parameters():
        if is_stiefel(p):
            assert orthonormality_error(p) <= 1e-5


def test_trainer_refuses_step_in_backward(tmp_path):
    trainer = _trainer(_model(), tmp_path / "sib", step_in_backward=True)
    with pytest.raises(ValueError, match="step_in_backward=True.*cannot run under transformers.Trainer"):
        trainer.train()
    assert not os.path.exists(tmp_path / "sib" / "checkpoint-3")
