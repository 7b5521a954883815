"""One contract test over the whole registry: build, backward, fit with callbacks, checkpoint, head split."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import zoo
from lightning_reg import LabelSmoothing, MixUp
from tests.helpers import fast_trainer

# Tiny versions of every registered model and the shape of one input sample, so the whole table runs fast.
TINY = {
    "cnn_small": ({"widths": (4, 8)}, (1, 8, 8)),
    "cnn": ({"widths": (4, 8, 8)}, (1, 8, 8)),
    "mlp": ({"widths": (8, 8), "in_features": 64}, (1, 8, 8)),
    "resnet18": ({"in_channels": 1}, (1, 16, 16)),
    "lstm": ({"hidden_size": 8, "num_layers": 2, "weight_drop": 0.2, "hidden_dropout": 0.1}, (6, 8)),
    "gru": ({"hidden_size": 8, "bidirectional": True}, (6, 8)),
    "transformer": ({"dim": 8, "depth": 1, "num_heads": 2}, (6, 8)),
    "vit_tiny": ({"dim": 12, "depth": 1, "num_heads": 3, "image_size": 16, "in_channels": 1}, (1, 16, 16)),
}
NUM_CLASSES = 3


def test_every_registered_model_has_a_tiny_configuration():
    assert sorted(TINY) == zoo.list_models()


@pytest.mark.parametrize("name", zoo.list_models())
def test_zoo_model_contract(name, tmp_path):
    kwargs, sample_shape = TINY[name]
    L.seed_everything(0, verbose=False)
    model = zoo.create(name, num_classes=NUM_CLASSES, **kwargs)
    assert isinstance(model, zoo.ClassifierModule)
    assert model.num_classes == NUM_CLASSES
    x = torch.randn(4, *sample_shape)
    y = torch.arange(4) % NUM_CLASSES

    # forward and backward on a tiny batch: every trainable parameter gets a gradient
    F.cross_entropy(model(x), y).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]

    # fit 2 steps with the mixing callbacks (soft targets reach the loss)
    model.zero_grad()
    loader = DataLoader(TensorDataset(torch.randn(8, *sample_shape), torch.arange(8) % NUM_CLASSES), batch_size=4)
    callbacks = [MixUp(0.4, num_classes=NUM_CLASSES), LabelSmoothing(0.1, num_classes=NUM_CLASSES)]
    trainer = fast_trainer(tmp_path, max_steps=2, callbacks=callbacks, limit_val_batches=1)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.global_step == 2

    # saves and reloads from a checkpoint, hyperparameters included
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = type(model).load_from_checkpoint(path)
    model.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
        # the forward_features / forward_head split of design.md
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
