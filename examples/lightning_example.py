"""A Lightning fit made contract-checked: provetrain's AdamW holds the clip, ProvetrainCallback certifies.

    pip install 'provetrain[lightning]' && python examples/lightning_example.py

The changes from a plain Lightning script are marked "provetrain". Batch 5 is poisoned with a NaN loss to
show the step being skipped, the schedule held, and both counted in runs/lightning-example/certificate.json.
"""

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from provetrain.integrations.lightning import ProvetrainCallback  # provetrain
from provetrain.ops.adam import AdamW  # provetrain


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss * math.nan if self.global_step == 5 else loss  # an injected failure

    def configure_optimizers(self) -> dict:
        optimizer = AdamW(self.parameters(), lr=3e-3, clip_value=1.0)  # provetrain: the clip lives here
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(1024, 8)
    data = DataLoader(TensorDataset(x, x.sin().sum(1, keepdim=True)), batch_size=32, shuffle=True)
    trainer = pl.Trainer(
        max_steps=200,
        accelerator="cpu",
        default_root_dir="runs/lightning-example",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ProvetrainCallback()],  # provetrain; and no gradient_clip_val
    )
    trainer.fit(Regression(), data)
    certificate = json.loads(Path("runs/lightning-example/certificate.json").read_text())
    print({k: certificate["run"][k] for k in ("steps", "applied_steps", "skipped_steps")})
    for c in certificate["clauses"]:
        if c["checks"]:
            print(f"{c['kind']:>13} {c['text']:<45} checks={c['checks']:<4} violations={c['violations']}")
