"""Hugging Face ``transformers.Trainer`` integration (imported on demand: ``transformers`` is not a
dependency of the library).

``Trainer`` takes :class:`~stiefel_sct.SpectralAdam` as any optimizer
(``Trainer(..., optimizers=(SpectralAdam(model.parameters(), ...), scheduler))``), clips and
accumulates gradients before ``step()`` and saves and resumes its own checkpoints, optimizer state
included. What it cannot know is that the model's linear layers are spectral, at ranks that
``energy=``/``budget=`` chose per layer: a model built afresh from ``from_pretrained`` is dense.
:class:`SpectralCheckpointCallback` writes a spectral checkpoint (:func:`~stiefel_sct.save_spectral`)
into every ``checkpoint-N/spectral`` folder Trainer saves, so another process rebuilds the
spectral model before resuming::

    model = load_spectral(AutoModelForCausalLM.from_pretrained(base), "out/checkpoint-300/spectral")
    trainer = Trainer(model=model, optimizers=(SpectralAdam(model.parameters()), None), ...,
                      callbacks=[SpectralCheckpointCallback()])
    trainer.train(resume_from_checkpoint="out/checkpoint-300")
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from .checkpoint import save_spectral
from .optim import SpectralAdam

__all__ = ["SPECTRAL_SUBDIR", "SpectralCheckpointCallback"]

SPECTRAL_SUBDIR = "spectral"


def _unwrap(optimizer):
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class SpectralCheckpointCallback(TrainerCallback):
    """Saves ``checkpoint-N/spectral`` (layers, ranks and weights) beside each Trainer checkpoint,
    and refuses a ``SpectralAdam(step_in_backward=True)`` that Trainer cannot drive.

    ``step_in_backward`` applies each update inside ``backward()`` and frees the gradient, so by
    the time Trainer clips the gradient norm or sums ``gradient_accumulation_steps`` micro-batches
    there is no gradient left: the clipping would silently do nothing and every micro-batch would
    take a step. Under Trainer, use the default ``step_in_backward=False``.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = _unwrap(optimizer)
        if isinstance(opt, SpectralAdam) and opt.step_in_backward:
            raise ValueError("SpectralAdam(step_in_backward=True) cannot run under transformers.Trainer: Trainer "
                             "clips and accumulates gradients after backward(), when step_in_backward has already "
                             "applied and freed them. Use step_in_backward=False (the default).")
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save and model is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", SPECTRAL_SUBDIR)
            save_spectral(model, folder)
        return control
