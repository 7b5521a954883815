import importlib.util
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_timm.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("example_finetune_timm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_example_pretrains_saves_and_finetunes_with_frozen_bn(tmp_path):
    example = _load_example()
    out = example.main(
        "test_resnet", image_size=16, epochs=1, workdir=tmp_path, limit_train_batches=2, limit_val_batches=1
    )
    assert out["checkpoint"].is_file()
    assert out["finetuned_checkpoint"].is_file()
    assert 0.0 <= out["finetuned_test_acc"] <= 1.0
    model = out["model"]
    assert model.num_classes == 2
    assert model.backbone_lr_scale == 0.1
    source_state = torch.load(out["checkpoint"], weights_only=True)["state_dict"]
    for name, module in model.net.named_modules():
        if isinstance(module, _BatchNorm):
            # frozen BN: the statistics after fine-tuning are the source model's
            torch.testing.assert_close(module.running_mean, source_state[f"net.{name}.running_mean"])
