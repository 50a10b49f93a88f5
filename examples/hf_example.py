"""A transformers.Trainer run made contract-checked: provetrain's AdamW holds the clip, the callback certifies.

    pip install 'provetrain[hf]' && HF_HUB_OFFLINE=1 python examples/hf_example.py

The changes from a plain Trainer script are marked "provetrain". A tiny GPT-2 is built from a config (no
download). Step 5's loss is poisoned with NaN (its gradients stay finite): the Trainer's NaN filter would
hide it from the logged loss and apply the step; here it is skipped and counted in the certificate. The
warmup's first step runs at lr = 0, which the certificate counts against the precondition ``lr > 0.0``.
"""

import json
import math
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, get_cosine_schedule_with_warmup

from provetrain.integrations.hf import ProvetrainTrainerCallback, skip_aware_scheduler  # provetrain
from provetrain.ops.adam import AdamW  # provetrain

STEPS, OUT = 40, Path("runs/hf-example")


class Copies(torch.utils.data.Dataset):
    """Token sequences that repeat their first half."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (2048, 8), generator=torch.Generator().manual_seed(0)).repeat(1, 2)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


if __name__ == "__main__":
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    )
    calls = iter(range(10**9))
    model.register_forward_hook(  # an injected failure: NaN loss, finite gradients
        lambda m, i, out: out.__setitem__("loss", out["loss"] + math.nan) if m.training and next(calls) == 5 else None
    )
    optimizer = AdamW(model.parameters(), lr=1e-2, clip_value=1.0)  # provetrain: the clip lives here
    schedule = skip_aware_scheduler(get_cosine_schedule_with_warmup(optimizer, 5, STEPS), optimizer)  # provetrain
    args = TrainingArguments(
        output_dir=str(OUT), max_steps=STEPS, per_device_train_batch_size=16, logging_steps=10,
        max_grad_norm=0.0,  # provetrain: the Trainer must not clip first
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    callback = ProvetrainTrainerCallback()  # provetrain
    Trainer(model, args, train_dataset=Copies(), optimizers=(optimizer, schedule), callbacks=[callback]).train()
    certificate = json.loads((OUT / "certificate.json").read_text())
    print({k: certificate["run"][k] for k in ("steps", "applied_steps", "skipped_steps")})
    for c in certificate["clauses"]:
        if c["checks"]:
            print(f"{c['kind']:>13} {c['text']:<45} checks={c['checks']:<4} violations={c['violations']}")
