"""The same training as bench/peers/plain_ddp.py, written for PyTorch Lightning 2.x: the second peer.

    torchrun --standalone --nproc_per_node=2 bench/peers/lightning_fit.py [--epochs 2] [--subset N] [--root DIR]

Lightning sees torchrun's environment (torchelastic) and joins its 2 processes: Trainer(accelerator="cpu",
devices=2, strategy="ddp", precision="bf16-mixed"), Lightning's defaults otherwise (its logger,
end-of-epoch checkpoint and progress bar, under --root). Fashion-MNIST from its IDX files, the same
48,000 training samples as ddp_train (its 80% split drawn with seed 42), ddp_train's narrow ResNet-10
(width 16) with plain BatchNorm (Lightning's sync_batchnorm refuses CPU tensors), DataLoaders with 2
workers over uint8 tensors (each rank normalises whole batches), channels_last, SGD (momentum 0.9,
Nesterov, weight decay 5e-4) with a per-step one-cycle lr up to 0.2, global batch 256. Then
``trainer.test`` on the test set; rank 0 prints ``test | acc A | count N``.

Lightning is not a dependency of ddp_train: ``pip install -e '.[bench]'`` installs it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

try:
    import lightning as L
    from torchmetrics.classification import MulticlassAccuracy
except ImportError:
    print("lightning_fit.py: error: lightning is not installed; install it with pip install -e '.[bench]' "
          "(or leave this peer out: bench/compare_peers.py --only ddp_sync,ddp_nosync,plain)", file=sys.stderr)
    sys.exit(2)

from ddp_train.models import build_model
from fashion_data import fashion, normalise, work_arguments  # beside this script


class FashionResNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = build_model("resnet10", 10, in_channels=1, width=16).to(memory_format=torch.channels_last)
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")  # synchronised across ranks when logged

    def on_train_start(self) -> None:
        if self.global_rank == 0:  # the driver times the start-up to this line
            print(f"train | {self.trainer.world_size} ranks | {self.trainer.num_training_batches} steps per epoch",
                  flush=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(normalise(x)), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self.model(normalise(x)).argmax(1), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):  # noqa: ANN201 (Lightning's dict)
        optimizer = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=0.2, total_steps=int(self.trainer.estimated_stepping_batches), cycle_momentum=False)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main() -> None:
    parser = work_arguments(__doc__)
    parser.add_argument("--root", default=None, help="Lightning's default_root_dir (logs, checkpoints)")
    args = parser.parse_args()
    L.seed_everything(42)
    devices = 2
    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=1, strategy="ddp", max_epochs=args.epochs,
                        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
                        default_root_dir=args.root)
    per_rank = args.batch_size // devices
    # Lightning puts a DistributedSampler (shuffled, seeded) under these loaders; drop_last as ddp_train does.
    train = DataLoader(fashion("train", args.subset), batch_size=per_rank, shuffle=True, num_workers=2,
                       drop_last=True)
    test = fashion("test", args.subset)
    module = FashionResNet()
    trainer.fit(module, train)
    result = trainer.test(module, DataLoader(test, batch_size=per_rank, num_workers=2))
    if trainer.global_rank == 0:
        print(f"test | acc {result[0]['test_acc']:.4f} | count {len(test)}", flush=True)


if __name__ == "__main__":
    main()
