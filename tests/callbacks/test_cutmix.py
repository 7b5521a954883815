import lightning as L
import pytest
import torch

from lightning_reg import CutMix, MixUpCutMix
from lightning_reg.mixins import MixedTargets, SparseMixingMixin
from tests.helpers import TinyCNN, UserClassifier, fast_trainer, make_images, make_loader


def _images(batch_size=8):
    x, y = make_images(32)
    return make_loader(x, y, batch_size)


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_trains_on_soft_targets_and_leaves_validation_alone(tmp_path, per_sample):
    L.seed_everything(0, verbose=False)
    model = UserClassifier(net=TinyCNN())
    cb = CutMix(alpha=1.0, per_sample=per_sample)
    fast_trainer(tmp_path, max_epochs=3, callbacks=[cb]).fit(model, _images(), _images())
    assert all(t.shape == (8, 3) and torch.allclose(t.sum(1), torch.ones(8)) for t in model.seen_targets["train"])
    assert all(t.ndim == 1 for t in model.seen_targets["val"])
    assert sum(model.train_losses[-4:]) < sum(model.train_losses[:4])


class _RecordInputs(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch[0].clone(), batch[1].clone()))


def test_cutmix_targets_match_the_pasted_area(tmp_path):
    # Images whose pixels all equal the sample's index: the pasted fraction is visible in the pixels.
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 8, 8).contiguous()
    loader = make_loader(x, torch.arange(8) % 3, batch_size=8)
    record = _RecordInputs()
    L.seed_everything(0, verbose=False)
    fast_trainer(tmp_path, max_steps=1, callbacks=[CutMix(per_sample=True), record]).fit(
        UserClassifier(net=TinyCNN()), loader
    )
    mixed, targets = record.batches[0]
    own = (mixed == x).float().flatten(1).mean(1)
    own_class_weight = targets[torch.arange(8), torch.arange(8) % 3]
    # Own weight is lam (plus the partner's share when the partner has the same class).
    assert bool((own_class_weight >= own - 1e-6).all())


def test_mixup_cutmix_switches_between_both(tmp_path):
    record = _RecordInputs()
    L.seed_everything(0, verbose=False)
    x, y = make_images(64)
    cb = MixUpCutMix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    fast_trainer(tmp_path, max_epochs=1, callbacks=[cb, record]).fit(
        UserClassifier(net=TinyCNN()), make_loader(x, y, 8)
    )
    originals = list(x.split(8))
    # CutMix keeps some original pixels exactly; MixUp changes (almost) every pixel.
    kinds = {
        bool((mixed == orig).float().mean() > 0.2) for (mixed, _), orig in zip(record.batches, originals, strict=True)
    }
    assert kinds == {True, False}


def test_sequences_of_floats_are_cut_along_time(tmp_path):
    record = _RecordInputs()
    L.seed_everything(0, verbose=False)
    x = torch.randn(16, 6, 4)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24, 3))
    fast_trainer(tmp_path, max_steps=1, callbacks=[CutMix(), record]).fit(
        UserClassifier(net=net), make_loader(x, torch.arange(16) % 3, 16)
    )
    mixed = record.batches[0][0]
    changed = (mixed != x).any(2)  # (N, T)
    assert torch.equal(changed, (mixed != x).all(2))  # whole time steps are replaced, all features at once
    rows = changed[changed.any(1)]  # samples paired with themselves are unchanged
    assert bool((rows == rows[0]).all())  # one span for the batch
    steps = rows[0].nonzero().flatten()
    assert len(steps) > 0
    assert steps.tolist() == list(range(int(steps[0]), int(steps[-1]) + 1))  # a contiguous span


class _SparseUser(SparseMixingMixin, UserClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_targets["train"].append(y)
        loss = self.mixed_cross_entropy(self(x), y)
        self.train_losses.append(float(loss.detach()))
        return loss


def test_cutmix_sparse_targets_give_the_dense_loss(tmp_path):
    losses = []
    for cls in (UserClassifier, _SparseUser):
        L.seed_everything(0, verbose=False)
        model = cls(net=TinyCNN())
        fast_trainer(tmp_path, max_steps=3, callbacks=[CutMix(per_sample=True, label_smoothing=0.1)]).fit(
            model, _images()
        )
        losses.append(model.train_losses)
    assert isinstance(model.seen_targets["train"][0], MixedTargets)
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"switch_prob": 1.5}, r"`switch_prob` to be a float in \[0, 1\]"),
        ({"mixup_alpha": 0}, "`mixup_alpha` to be a positive"),
        ({"cutmix_alpha": -2.0}, "`cutmix_alpha` to be a positive"),
        ({"pairing": "flip"}, r"`pairing` to be one of \['shift', 'permutation'\]"),
    ],
)
def test_mixup_cutmix_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixUpCutMix(**kwargs)


def test_cutmix_without_default_dims_says_to_pass_dims(tmp_path):
    cb = CutMix(num_classes=3)
    trainer = fast_trainer(tmp_path)
    cb.setup(trainer, UserClassifier(), "fit")
    with pytest.raises(ValueError, match="Pass `dims=`"):
        cb.on_train_batch_start(trainer, UserClassifier(), [torch.zeros(2, 1, 1, 1, 1, 1), torch.tensor([0, 1])], 0)


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_default_and_inplace_give_the_same_batches(tmp_path, per_sample):
    batches = []
    for inplace in (False, True):  # the default pastes from shifted runs into a reused output; inplace gathers
        record = _RecordInputs()
        L.seed_everything(0, verbose=False)
        cb = CutMix(per_sample=per_sample, inplace=inplace)
        fast_trainer(tmp_path, max_steps=3, callbacks=[cb, record]).fit(UserClassifier(net=TinyCNN()), _images())
        batches.append(record.batches)
    for (x_a, y_a), (x_b, y_b) in zip(*batches, strict=True):
        assert torch.equal(x_a, x_b)
        assert torch.equal(y_a, y_b)


class _Metrics(L.Callback):
    def __init__(self):
        self.metrics = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_mixup_cutmix_logs_the_share_of_each_per_epoch(tmp_path):
    record, switches = _Metrics(), _RecordInputs()
    L.seed_everything(0, verbose=False)
    x, y = make_images(64)
    cb = MixUpCutMix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    fast_trainer(tmp_path, max_epochs=1, callbacks=[cb, switches, record]).fit(
        UserClassifier(net=TinyCNN()), make_loader(x, y, 8)
    )
    # CutMix keeps original pixels exactly (more than a fifth of them); MixUp changes almost all.
    cut = [bool((m == o).float().mean() > 0.2) for (m, _), o in zip(switches.batches, x.split(8), strict=True)]
    assert record.metrics["mixup_cutmix/cutmix_fraction"] == pytest.approx(sum(cut) / 8)
    assert record.metrics["mixup_cutmix/mixed_fraction"] == 1.0
    assert 0 < record.metrics["mixup_cutmix/lambda"] < 1
