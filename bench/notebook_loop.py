"""The notebook recipe's single-process loop, as the baseline ddp_train is compared with.

    python bench/notebook_loop.py [--steps 20] [--batch-size 64] [--workers 2]

PIL transforms in a 2-worker DataLoader (Resize 40 -> RandomResizedCrop 32 -> flip -> ToTensor ->
Normalize -> Cutout 16), ResNet-18 with the 3x3 stem, SGD(0.01, momentum 0.9, wd 5e-4), fp32,
contiguous layout, a host sync every step (loss.item(), as the notebook's running loss does), on the
GPU when there is one.
Images: ddp_train's synthetic set (CIFAR-10 is not on this machine; the shapes are the same).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from ddp_train.data import synthetic
from ddp_train.data.transforms import Cutout
from ddp_train.models import build_model


class PILImages(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    images, labels = synthetic.generate("train", args.batch_size * (args.steps + args.warmup))
    transform = transforms.Compose([
        transforms.Resize(40), transforms.RandomResizedCrop(32, scale=(0.64, 1.0), ratio=(1.0, 1.0)),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.4914, 0.4823, 0.4465], [0.2023, 0.1920, 0.2210]), Cutout(1, 16),
    ])
    loader = torch.utils.data.DataLoader(PILImages(images, labels, transform), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers, drop_last=True)
    torch.manual_seed(42)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the notebook's model.cuda()
    model = build_model("resnet18", 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    start = None
    for i, (x, y) in enumerate(loader):
        if i == args.warmup:
            start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
    seconds = time.perf_counter() - start
    print(f"notebook loop: {args.steps * args.batch_size / seconds:.1f} img/s "
          f"(batch {args.batch_size}, {args.workers} loader workers, fp32, on {device}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
