import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_reg import CutMix, LabelSmoothing, MixUp, MixUpCutMix
from lightning_reg import functional as LF
from lightning_reg.mixins import MixedTargets, SparseMixingMixin
from tests.helpers import TinyCNN, UserClassifier, coded_images, fast_trainer, make_images, make_loader


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
    # Images whose pixels all equal the sample's index, one class per sample: the pixels show what was kept and
    # from whom the box came; the target row must hold exactly those two shares.
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 8, 8).contiguous()
    cb = CutMix(per_sample=True, num_classes=8)
    trainer, module = fast_trainer(tmp_path), UserClassifier(net=TinyCNN(), num_classes=8)
    cb.setup(trainer, module, "fit")
    for _ in range(5):
        batch = [x, torch.arange(8)]
        cb.on_train_batch_start(trainer, module, batch, 0)
        mixed, targets = batch
        for i in range(8):
            own = float((mixed[i] == i).float().mean())
            pasted = mixed[i][mixed[i] != i].unique()
            assert len(pasted) <= 1  # one partner
            partner = int(pasted) if len(pasted) else None
            assert float(targets[i, i]) == pytest.approx(own, abs=1e-6)
            if partner is not None:
                assert float(targets[i, partner]) == pytest.approx(1 - own, abs=1e-6)
            assert float(targets[i].sum()) == pytest.approx(1.0, abs=1e-6)


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


# --- issue 12, point 4: CutMix on padded token sequences --------------------------------------------------------
def _token_batches(n=16, t=12, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    ids = torch.randint(1, 50, (n, t), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    return ids * mask + pad * (1 - mask), mask, lengths


class _MaskedTokens(UserClassifier):
    def __init__(self):
        super().__init__(net=torch.nn.Embedding(50, 3))
        self.batches = []

    def training_step(self, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = (self.net(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return F.cross_entropy(logits, batch["labels"])


def _dict_loader(ids, mask, lengths=None, batch_size=8):
    from torch.utils.data import DataLoader

    rows = [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": torch.tensor(i % 3)}
        | ({"lengths": lengths[i]} if lengths is not None else {})
        for i in range(len(ids))
    ]
    return DataLoader(rows, batch_size=batch_size)


def test_cutmix_carries_the_attention_mask_with_the_same_spans(tmp_path):
    ids, mask, _ = _token_batches()
    model = _MaskedTokens()
    cb = CutMix(1.0, input_key="input_ids", target_key="labels", carry=["attention_mask"], per_sample=True)
    L.seed_everything(0, verbose=False)
    fast_trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model, _dict_loader(ids, mask))
    assert len(model.batches) == 4
    changed = 0
    for batch, orig_mask in zip(model.batches, list(mask.split(8)) * 2, strict=True):
        assert torch.equal(batch["input_ids"] == 0, batch["attention_mask"] == 0)  # tokens agree with their mask
        changed += int((batch["attention_mask"] != orig_mask).sum())
    assert changed > 0  # the mask really followed the pasted spans


def test_cutmix_refuses_a_stale_mask_or_lengths_and_keep_silences_it(tmp_path):
    ids, mask, lengths = _token_batches()
    cb = CutMix(1.0, input_key="input_ids", target_key="labels")
    with pytest.raises(
        ValueError, match=r"batch\['attention_mask'\].*padding or attention mask.*carry=\['attention_mask'\]"
    ):
        fast_trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(_MaskedTokens(), _dict_loader(ids, mask))
    cb = CutMix(1.0, input_key="input_ids", target_key="labels", carry=["attention_mask"])
    with pytest.raises(ValueError, match=r"batch\['lengths'\].*looks like sequence lengths.*padding mask"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(_MaskedTokens(), _dict_loader(ids, mask, lengths))
    cb = CutMix(1.0, input_key="input_ids", target_key="labels", carry=["lengths"])
    with pytest.raises(ValueError, match="Sequence lengths cannot follow a cut"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(_MaskedTokens(), _dict_loader(ids, mask, lengths))
    cb = CutMix(1.0, input_key="input_ids", target_key="labels", carry={"attention_mask": "cut", "lengths": "keep"})
    fast_trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(_MaskedTokens(), _dict_loader(ids, mask, lengths))
    with pytest.raises(ValueError, match="'cut' or 'keep'"):
        CutMix(carry={"attention_mask": "paste"})


def test_cutmix_refuses_lengths_in_a_list_batch_like_the_zoo_rnns():
    # The zoo's RNN batches are [x (N, T, D), y, lengths]: lengths cannot describe a sequence with a pasted span.
    x, y, lengths = torch.rand(4, 6, 2), torch.tensor([0, 1, 2, 0]), torch.tensor([6, 3, 5, 2])
    cb = CutMix(num_classes=3)
    trainer, module = fast_trainer(), UserClassifier()
    cb.setup(trainer, module, "fit")
    with pytest.raises(ValueError, match=r"batch\[2\] \(4,\) looks like sequence lengths"):
        cb.on_train_batch_start(trainer, module, [x, y, lengths], 0)


# --- issue 12, point 22: the peers' features through the callbacks -------------------------------------------
def _one_batch(cb, x, y, trainer=None):
    L.seed_everything(0, verbose=False)  # the callback's stream derives from Lightning's seed
    trainer = trainer or fast_trainer()
    module = UserClassifier(net=TinyCNN(), num_classes=int(y.max()) + 1 if y.ndim == 1 else y.shape[1])
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    batch = [x, y]
    cb.on_train_batch_start(trainer, module, batch, 0)
    return batch


def test_callback_correct_lam_false_uses_the_drawn_lambda_and_minmax_the_box():
    n = 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    y = torch.arange(n)  # unique labels: the own weight is exactly the own weight
    L.seed_everything(0, verbose=False)
    for correct_lam in (True, False):
        cb = CutMix(1.0, num_classes=n, per_sample=True, correct_lam=correct_lam, pairing="permutation")
        trainer, module = fast_trainer(), UserClassifier(net=TinyCNN(), num_classes=n)
        cb.setup(trainer, module, "fit")
        replay = torch.Generator()
        replay.set_state(cb.generator.get_state())
        batch = [x, y]
        cb.on_train_batch_start(trainer, module, batch, 0)
        own = batch[1][torch.arange(n), y]
        area = (batch[0] == x).float().flatten(1).mean(1)
        drawn = LF.sample_mixup(n, 1.0, per_sample=True, pairing="permutation", generator=replay).lam
        if correct_lam:
            assert torch.allclose(own, area)
        else:
            assert torch.allclose(own, drawn)
            assert not torch.allclose(own, area)  # some boxes were clipped
    cb = CutMix(1.0, num_classes=n, per_sample=True, cutmix_minmax=(0.25, 0.5))
    batch = _one_batch(cb, x, y)
    own = batch[1][torch.arange(n), y]
    area = (batch[0] == x).float().flatten(1).mean(1)
    assert torch.allclose(own, area)
    assert bool((area <= 1 - 2 * 2 / 64 + 1e-6).all())
    assert bool((area >= 1 - 3 * 3 / 64 - 1e-6).all())


@pytest.mark.parametrize("make_callback", [CutMix, MixUpCutMix])
def test_five_dim_inputs_need_dims_in_the_callbacks_too(make_callback):
    with pytest.raises(ValueError, match="cannot tell the layout of a 5-D input"):
        _one_batch(make_callback(num_classes=3), torch.zeros(4, 2, 3, 4, 4), torch.tensor([0, 1, 2, 0]))
    video = torch.rand(4, 2, 3, 4, 4)
    batch = _one_batch(make_callback(num_classes=3, dims="NTCHW", prob=1.0), video, torch.tensor([0, 1, 2, 0]))
    assert batch[0].shape == video.shape


def test_elem_mode_draws_apply_and_switch_per_sample(tmp_path):
    n = 64
    x = coded_images(n)
    y = torch.arange(n)
    cb = MixUpCutMix(1.0, 1.0, switch_prob=0.5, num_classes=n, prob=0.6, mode="elem", pairing="permutation")
    mixed, targets = _one_batch(cb, x, y)
    own = targets[torch.arange(n), y]
    unmixed = own == 1
    kept_pixels = (mixed == x).float().flatten(1).mean(1)
    cut = ~unmixed & (kept_pixels > 0)  # CutMix samples keep some original pixels exactly
    blended = ~unmixed & (kept_pixels == 0)  # MixUp samples change every pixel
    assert 10 < int(unmixed.sum()) < 45  # prob=0.6 per sample
    assert int(cut.sum()) > 5
    assert int(blended.sum()) > 5
    assert torch.allclose(own[cut], kept_pixels[cut])
    assert torch.equal(mixed[unmixed], x[unmixed])


def test_pair_mode_gives_both_members_of_a_pair_the_same_draws():
    n = 16
    x = torch.rand(n, 1, 8, 8)
    y = torch.arange(n)
    L.seed_everything(0, verbose=False)
    for pairing in ("shift", "permutation"):
        cb = MixUpCutMix(1.0, 1.0, num_classes=n, mode="pair", pairing=pairing)
        _mixed, targets = _one_batch(cb, x.clone(), y)
        partner = targets.clone()
        partner[torch.arange(n), y] = 0
        own = targets[torch.arange(n), y]
        mixed = own < 1  # (a box can come out empty, or lambda round to 1: such pairs show no partner)
        assert int(mixed.sum()) >= n // 2
        index = partner.argmax(1)  # the other label in each mixed row
        assert torch.equal(index[index][mixed], torch.arange(n)[mixed])  # mutual pairs
        assert torch.allclose(own[mixed], own[index][mixed])  # both members share lambda (or the box)
        if pairing == "shift":
            assert torch.equal(index[mixed], torch.arange(n).flip(0)[mixed])  # timm's pairs i, N - 1 - i


def test_multi_hot_targets_need_multi_label_and_are_smoothed_per_entry(tmp_path):
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match=r"a row sums to 3.*multi_label=True"):
        _one_batch(CutMix(num_classes=3, label_smoothing=0.1), x, y)
    batch = _one_batch(CutMix(num_classes=3, label_smoothing=0.2, multi_label=True, prob=0.0), x, y)
    assert torch.allclose(batch[1], y * 0.8 + 0.1)  # per-entry binary smoothing, timm's multi_label
    batch = _one_batch(MixUp(1.0, num_classes=3, multi_label=True), x, y)
    assert bool((batch[1].sum(1) > 1.01).any())  # still multi-hot, not renormalized
    batch = _one_batch(LabelSmoothing(0.2, num_classes=3, multi_label=True), x, y)
    assert torch.allclose(batch[1], y * 0.8 + 0.1)


def test_dense_targets_are_refused_plainly_by_the_callbacks():
    with pytest.raises(ValueError, match=r"segmentation masks \(N, H, W\) are not supported"):
        _one_batch(CutMix(num_classes=3), torch.rand(4, 1, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long))


def test_callbacks_build_float64_targets_under_a_float64_default_dtype(tmp_path):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        L.seed_everything(0, verbose=False)
        model = UserClassifier(net=TinyCNN())
        fast_trainer(tmp_path, max_steps=2, callbacks=[MixUpCutMix(num_classes=3, label_smoothing=0.1)]).fit(
            model, make_loader(*[t.double() if t.is_floating_point() else t for t in make_images(16)], 8)
        )
    finally:
        torch.set_default_dtype(previous)
    assert all(t.dtype == torch.float64 for t in model.seen_targets["train"])


@pytest.mark.parametrize(("switch_prob", "low", "high"), [(0.9, 12, 16), (0.1, 0, 4)])
def test_switch_prob_is_the_probability_of_cutmix(tmp_path, switch_prob, low, high):
    switches = _RecordInputs()
    L.seed_everything(0, verbose=False)
    x, y = make_images(128)
    cb = MixUpCutMix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob)
    fast_trainer(tmp_path, max_epochs=1, callbacks=[cb, switches]).fit(
        UserClassifier(net=TinyCNN()), make_loader(x, y, 8)
    )
    # CutMix keeps original pixels exactly (more than a fifth of them); MixUp changes almost all.
    cut = sum(bool((m == o).float().mean() > 0.2) for (m, _), o in zip(switches.batches, x.split(8), strict=True))
    assert low <= cut <= high  # 16 batches: about 14 of them CutMix at 0.9, about 2 at 0.1


_ELEM = {"mode": "elem", "dims": (1, 2), "carry": {"lengths": "keep", "mask": "cut"}, "cutmix_minmax": (0.3, 0.6)}


@pytest.mark.parametrize("correct_lam", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        lambda n, **kw: MixUpCutMix(1.0, 1.0, switch_prob=0.5, num_classes=n, **kw),
        lambda n, **kw: CutMix(1.0, num_classes=n, prob=0.7, **kw),
    ],
    ids=["MixUpCutMix", "CutMix"],
)
def test_elem_mode_carries_each_samples_box_into_the_mask_and_weighs_targets_by_it(make, correct_lam):
    n = 32
    x, y = coded_images(n, layout="NHWC"), torch.arange(n)
    mask = x[..., 0].clone()  # (N, H, W): the same codes as the image
    cb = make(n, **_ELEM, correct_lam=correct_lam, pairing="permutation", input_key="x", target_key="y")
    L.seed_everything(0, verbose=False)
    trainer, module = fast_trainer(), UserClassifier(net=TinyCNN(), num_classes=n)
    cb.setup(trainer, module, "fit")
    lengths = torch.full((n,), 8)
    batch = {"x": x.clone(), "y": y, "mask": mask.clone(), "lengths": lengths}
    cb.on_train_batch_start(trainer, module, batch, 0)
    assert batch["lengths"] is lengths  # carried as "keep": left alone
    own = batch["y"][torch.arange(n), y]
    kept = (batch["mask"] == mask).float().flatten(1).mean(1)  # the part of each mask left in place
    cut = kept < 1
    assert int(cut.sum()) > 5  # about half the samples are cut
    assert torch.equal(batch["x"][cut][..., 0], batch["mask"][cut])  # the mask got the image's very box
    assert torch.equal(batch["mask"][~cut], mask[~cut])  # MixUp or unmixed samples keep their mask
    assert bool(((batch["x"][~cut] == x[~cut]).all((1, 2, 3)) | (own[~cut] < 1)).all())
    sides = (1 - kept[cut]) * 64  # the box area in pixels, inside the minmax range of sides
    assert bool((sides >= int(0.3 * 8) ** 2).all())
    assert bool((sides <= int(0.6 * 8) ** 2).all())
    if correct_lam:  # the target weight is the area kept
        torch.testing.assert_close(own[cut], kept[cut])


def test_elem_mode_logs_the_share_of_samples_cut_and_their_mean_weight(tmp_path):
    L.seed_everything(0, verbose=False)
    x, y = make_images(64)
    cut_all = MixUpCutMix(1.0, 1.0, switch_prob=1.0, num_classes=3, mode="elem")
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[cut_all])
    trainer.fit(UserClassifier(net=TinyCNN()), make_loader(x, y, 16))
    metrics = trainer.callback_metrics
    assert float(metrics["mixup_cutmix/cutmix_fraction"]) == pytest.approx(1.0, abs=0.1)  # a box can come out empty
    assert float(metrics["mixup_cutmix/mixed_fraction"]) == 1.0
    assert 0.2 < float(metrics["mixup_cutmix/lambda"]) < 0.8
    never = MixUpCutMix(1.0, 1.0, switch_prob=0.0, num_classes=3, mode="elem")
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[never])
    trainer.fit(UserClassifier(net=TinyCNN()), make_loader(x, y, 16))
    assert float(trainer.callback_metrics["mixup_cutmix/cutmix_fraction"]) == 0.0


def test_cutmix_elem_mode_logs_the_share_of_samples_mixed_and_their_weight(tmp_path):
    L.seed_everything(0, verbose=False)
    x, y = make_images(64)
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[CutMix(1.0, num_classes=3, mode="elem", prob=0.5)])
    trainer.fit(UserClassifier(net=TinyCNN()), make_loader(x, y, 16))
    metrics = trainer.callback_metrics
    assert "cutmix/cutmix_fraction" not in metrics  # only MixUpCutMix chooses
    assert float(metrics["cutmix/mixed_fraction"]) == 1.0  # every batch is drawn for, sample by sample
    assert 0.6 < float(metrics["cutmix/lambda"]) < 0.9  # half the samples keep all (1), the others about half


def test_two_per_sample_boxes_each_weigh_their_own_row():
    n = 2
    x, y = coded_images(n), torch.arange(n)
    for seed in range(5):
        L.seed_everything(seed, verbose=False)
        batch = _one_batch(CutMix(1.0, num_classes=n, per_sample=True), x.clone(), y)
        own = batch[1][torch.arange(n), y]
        torch.testing.assert_close(own, (batch[0] == x).float().flatten(1).mean(1))


def test_inplace_cutmix_overwrites_the_loaders_tensor():
    x, y = coded_images(8), torch.arange(8) % 3
    original = x.clone()
    reference = _one_batch(CutMix(1.0, num_classes=3), original.clone(), y)
    batch = _one_batch(CutMix(1.0, num_classes=3, inplace=True), x, y)
    assert batch[0] is x
    assert not torch.equal(x, original)
    assert torch.equal(x, reference[0])


@pytest.mark.parametrize(
    ("carry", "error", "message"),
    [
        ("mask", TypeError, "Expected `carry` as batch keys or a mapping key -> 'cut' | 'keep', but got 'mask'."),
        (3.5, TypeError, "Expected `carry` as batch keys or a mapping key -> 'cut' | 'keep', but got 3.5."),
        ({"mask": "paste"}, ValueError, "Expected `carry['mask']` to be 'cut' or 'keep', but got 'paste'."),
    ],
)
def test_bad_carry_arguments_are_named_whole(carry, error, message):
    with pytest.raises(error, match="carry") as raised:
        CutMix(carry=carry)
    assert str(raised.value) == message


_EXPECTED_CARRY = (
    "CutMix(carry=['mask']): expected a tensor with the inputs' batch size 8 and the cut axes (2, 3) (such as a "
    "padding mask),"
)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            torch.ones(8, 3),
            f"{_EXPECTED_CARRY} but got (8, 3).",
        ),
        (
            torch.ones(8),
            f"{_EXPECTED_CARRY} but got (8,). Sequence lengths cannot follow a cut: a pasted span can leave padding "
            "inside a sequence. Give the model a padding mask (N, T) and carry that, or mix an embedding with "
            "`MixUp(layer=...)`.",
        ),
        (
            ["a"] * 8,
            f"{_EXPECTED_CARRY} but got list.",
        ),
        (
            torch.ones(8, 1, 8, 4),
            "CutMix(carry=['mask']): its shape (8, 1, 8, 4) differs from the inputs' (8, 1, 8, 8) along the cut axes "
            "(2, 3).",
        ),
    ],
    ids=["too few axes", "lengths", "not a tensor", "other size"],
)
def test_a_carried_entry_that_cannot_follow_the_cut_is_named_whole(entry, message):
    x, y = coded_images(8), torch.arange(8) % 3
    cb = CutMix(1.0, num_classes=3, carry=["mask"], input_key="x", target_key="y")
    trainer, module = fast_trainer(), UserClassifier(net=TinyCNN(), num_classes=3)
    cb.setup(trainer, module, "fit")
    with pytest.raises(ValueError, match="carry") as raised:
        cb.on_train_batch_start(trainer, module, {"x": x, "y": y, "mask": entry}, 0)
    assert str(raised.value) == message


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_bfloat16_inputs_get_target_weights_rounded_to_bfloat16_like_their_blend(mode):
    # MixUp samples are blended with a bfloat16 weight: their targets must carry that very weight, not the float32 draw.
    n = 64
    x, y = coded_images(n).to(torch.bfloat16), torch.arange(n)
    cb = MixUpCutMix(1.0, 1.0, switch_prob=0.5, num_classes=n, mode=mode)
    _, targets = _one_batch(cb, x, y)
    own = targets[torch.arange(n), y]
    blended = (own < 1) & (own > 0)
    assert int(blended.sum()) > 10
    assert torch.equal(own[blended].to(torch.bfloat16).float(), own[blended])


# --- what the mutation run found untested (issue 21) ------------------------------------------------------------------
def _own_pixels(mixed, x):
    """With coded images: the fraction of each image still its own."""
    return (mixed == x).float().flatten(1).mean(1)


def test_elem_mode_without_minmax_weighs_each_cut_target_by_the_area_it_keeps():
    n = 16
    x, y = coded_images(n), torch.arange(n)
    batch = _one_batch(CutMix(1.0, num_classes=n, mode="elem"), x.clone(), y)
    kept = _own_pixels(batch[0], x)
    assert bool((kept < 1).sum() > n // 2)
    torch.testing.assert_close(batch[1][torch.arange(n), y], kept)


@pytest.mark.parametrize("pairing", ["shift", "permutation"])
def test_batch_mode_pairs_by_a_shift_or_a_permutation(pairing):
    n, x = 10, coded_images(10)
    batch = _one_batch(CutMix(1.0, num_classes=n, pairing=pairing), x.clone(), torch.arange(n))
    pasted = batch[0] != x
    assert bool(pasted.any())
    partners = torch.stack([batch[0][i][pasted[i]][0] for i in range(n)]).long() - 1  # the code in the box
    offsets = set(((partners - torch.arange(n)) % n).tolist())
    assert (len(offsets) == 1) == (pairing == "shift")
    assert 0 not in offsets


def test_last_epoch_cuts_the_epochs_before_it():
    x = coded_images(4)
    batch = _one_batch(CutMix(1.0, num_classes=4, last_epoch=1), x.clone(), torch.arange(4))  # epoch 0
    assert not torch.equal(batch[0], x)


@pytest.mark.parametrize("kwargs", [{"mode": "elem"}, {"prob": 0.0}], ids=["elem", "unmixed"])
def test_sparse_targets_stay_sparse_in_elem_mode_and_on_unmixed_batches(kwargs):
    n = 8
    x, y = coded_images(n), torch.arange(n)
    cb = CutMix(1.0, num_classes=n, **kwargs)
    L.seed_everything(0, verbose=False)
    trainer, module = fast_trainer(), _SparseUser(net=TinyCNN(), num_classes=n)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    batch = [x.clone(), y]
    cb.on_train_batch_start(trainer, module, batch, 0)
    assert isinstance(batch[1], MixedTargets)
    torch.testing.assert_close(batch[1].to_dense()[torch.arange(n), y], _own_pixels(batch[0], x))


def test_a_bad_or_missing_carry_key_is_named_whole():
    with pytest.raises(TypeError, match="carry") as raised:
        CutMix(carry=[1.5])
    assert str(raised.value) == (
        "Expected `carry` to be an int (position in a list batch) or a str (key of a dict batch), but got 1.5 of "
        "type float."
    )
    cb = CutMix(1.0, num_classes=3, carry=["mask"], input_key="x", target_key="y")
    trainer, module = fast_trainer(), UserClassifier(net=TinyCNN(), num_classes=3)
    cb.setup(trainer, module, "fit")
    with pytest.raises(KeyError, match="carry") as missing:
        cb.on_train_batch_start(trainer, module, {"x": coded_images(4), "y": torch.arange(4) % 3}, 0)
    assert missing.value.args[0] == (
        "The batch is a dict with keys ['x', 'y'], but `carry='mask'` is not one of them. Pass `carry` naming the "
        "right entry."
    )


def test_lengths_beside_a_time_cut_are_refused_whole_and_per_sample_floats_are_not():
    x, y = torch.rand(4, 6, 2), torch.tensor([0, 1, 2, 0])
    cb = CutMix(num_classes=3)
    trainer, module = fast_trainer(), UserClassifier()
    cb.setup(trainer, module, "fit")
    with pytest.raises(ValueError, match="sequence lengths") as raised:
        cb.on_train_batch_start(trainer, module, [x, y, torch.tensor([6, 3, 5, 2])], 0)
    assert str(raised.value) == (
        "CutMix cuts spans of the time axis of batch[0] (4, 6, 2), and batch[2] (4,) looks like sequence lengths: a "
        "pasted span from a sequence of another length leaves padding inside the sequence (or tokens past its "
        "length), which lengths cannot describe. Use a padding mask (N, T) with `carry=[...]`, or mix an embedding "
        "with `MixUp(layer=...)`; map `carry={2: 'keep'}` if it is not lengths."
    )
    weights, flags = torch.rand(4), torch.ones(4, dtype=torch.bool)  # per-sample floats and flags: not positions
    cb.on_train_batch_start(trainer, module, [x, y, weights, flags, torch.rand(4, 3)], 0)


def test_a_two_axis_cut_of_three_dim_inputs_leaves_other_entries_alone():
    x, y = torch.rand(4, 6, 6), torch.tensor([0, 1, 2, 0])  # (N, H, W) cut along both image axes, not time
    cb = CutMix(num_classes=3, dims=(1, 2))
    trainer, module = fast_trainer(), UserClassifier()
    cb.setup(trainer, module, "fit")
    rows = torch.rand(4, 6)  # (N, H): a mask of steps only for a cut along time
    batch = [x.clone(), y, rows]
    cb.on_train_batch_start(trainer, module, batch, 0)
    assert batch[2] is rows


def test_correct_lam_false_with_one_lambda_for_the_batch_weighs_every_target_by_it():
    n, x, y = 8, coded_images(8), torch.arange(8)
    cb = CutMix(1.0, num_classes=n, correct_lam=False)
    L.seed_everything(0, verbose=False)
    trainer, module = fast_trainer(), UserClassifier(net=TinyCNN(), num_classes=n)
    cb.setup(trainer, module, "fit")
    replay = torch.Generator()
    replay.set_state(cb.generator.get_state())
    batch = [x.clone(), y]
    cb.on_train_batch_start(trainer, module, batch, 0)
    drawn = LF.sample_mixup(n, 1.0, generator=replay).lam  # one float for the batch
    assert isinstance(drawn, float)
    torch.testing.assert_close(batch[1][torch.arange(n), y], torch.full((n,), drawn))
