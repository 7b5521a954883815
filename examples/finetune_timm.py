"""Fine-tune a timm model from a local checkpoint with frozen batch norm and a slower backbone.

Step 1 trains a timm backbone on the bundled digits (10 classes), resized to RGB images, and saves a Lightning
checkpoint; with ``--checkpoint`` you start from your own file instead (a Lightning ``.ckpt``, or a ``.pth`` /
``.safetensors`` state dict of the same timm architecture). Step 2 builds a new model from that file with
another number of classes (even vs odd digits), keeps every BatchNorm layer in eval mode with its statistics
fixed, and trains the backbone at a tenth of the head's learning rate. No download anywhere.

    python examples/finetune_timm.py                              # resnet18 on 32x32 digits, CPU-friendly
    python examples/finetune_timm.py --backbone resnet10t --epochs 5
    python examples/finetune_timm.py --checkpoint my_weights.safetensors --backbone resnet18
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import zoo


def digits_as_rgb(image_size: int, parity: bool = False) -> dict[str, TensorDataset]:
    """The digits splits as ``(N, 3, image_size, image_size)`` images; ``parity`` relabels them even (0) / odd (1)."""
    data = zoo.data.DigitsDataModule()
    data.setup()
    splits = {}
    for name, dataset in (("train", data.train_set), ("val", data.val_set), ("test", data.test_set)):
        images, labels = dataset.tensors  # (N, 1, 8, 8), (N,)
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        splits[name] = TensorDataset(images.contiguous(), labels % 2 if parity else labels)
    return splits


def _trainer(workdir: Path, epochs: int, **overrides: Any) -> L.Trainer:
    kwargs: dict[str, Any] = {
        "max_epochs": epochs,
        "default_root_dir": str(workdir),
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "auto",
    }
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def main(
    backbone: str = "resnet18",
    *,
    checkpoint: str | Path | None = None,
    image_size: int = 32,
    epochs: int = 3,
    batch_size: int = 64,
    workdir: str | Path = "finetune_timm_out",
    **trainer_overrides: Any,
) -> dict[str, Any]:
    """Pretrain (unless ``checkpoint`` is given), then fine-tune on a new task; returns accuracies and paths."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    result: dict[str, Any] = {}

    if checkpoint is None:
        splits = digits_as_rgb(image_size)
        source = zoo.ImageClassifier(num_classes=10, backbone=backbone, lr=3e-3, label_smoothing=0.1)
        trainer = _trainer(workdir, epochs, **trainer_overrides)
        trainer.fit(
            source,
            DataLoader(splits["train"], batch_size=batch_size, shuffle=True),
            DataLoader(splits["val"], batch_size=256),
        )
        checkpoint = workdir / "source.ckpt"
        trainer.save_checkpoint(checkpoint)
        (metrics,) = trainer.test(source, DataLoader(splits["test"], batch_size=256), verbose=False)
        result["source_test_acc"] = float(metrics["test_acc"])
    result["checkpoint"] = Path(checkpoint)

    # The new task: 2 classes. The 10-class head in the file is skipped; the backbone's weights are loaded.
    model = zoo.ImageClassifier(
        num_classes=2,
        backbone=backbone,
        pretrained=str(checkpoint),
        freeze_bn=True,  # BN layers stay in eval mode: running statistics fixed, affine weights frozen
        backbone_lr_scale=0.1,  # the backbone learns 10x slower than the new head
        lr=3e-3,
    )
    splits = digits_as_rgb(image_size, parity=True)
    trainer = _trainer(workdir, epochs, **trainer_overrides)
    trainer.fit(
        model,
        DataLoader(splits["train"], batch_size=batch_size, shuffle=True),
        DataLoader(splits["val"], batch_size=256),
    )
    (metrics,) = trainer.test(model, DataLoader(splits["test"], batch_size=256), verbose=False)
    result["finetuned_test_acc"] = float(metrics["test_acc"])
    result["model"] = model
    finetuned = workdir / "finetuned.ckpt"
    trainer.save_checkpoint(finetuned)
    result["finetuned_checkpoint"] = finetuned
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18", help="any timm.list_models() name")
    parser.add_argument("--checkpoint", default=None, help="start from this .ckpt/.pth/.safetensors file")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", default="finetune_timm_out")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    out = main(
        args.backbone, checkpoint=args.checkpoint, image_size=args.image_size, epochs=args.epochs, workdir=args.workdir
    )
    print({k: v for k, v in out.items() if k != "model"})
