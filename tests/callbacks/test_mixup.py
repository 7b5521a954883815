import json
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_reg import CutMix, LabelSmoothing, MixUp, MixUpCutMix
from lightning_reg import functional as LF
from lightning_reg.mixins import MixedTargets, SparseMixingMixin
from tests.helpers import (
    TinyCNN,
    TinyMLP,
    UserClassifier,
    ddp_fork_trainer,
    fast_trainer,
    make_classification,
    make_images,
    make_loader,
    scrubbed_ddp_env,
)
from tests.helpers.ddp import skip_on_windows


def _loaders(n=48, batch_size=16, as_dict=False):
    x, y = make_classification(n)
    return make_loader(x, y, batch_size, as_dict=as_dict), make_loader(x, y, batch_size, as_dict=as_dict)


def _set_up(tmp_path, cb, module=None):
    """``cb`` set up for fit on a fresh Trainer, and a function that runs its batch hook on a batch (returned)."""
    module = module if module is not None else UserClassifier(num_classes=cb.num_classes or 3)
    trainer = fast_trainer(tmp_path)
    cb.setup(trainer, module, "fit")

    def mix(batch):
        cb.on_train_batch_start(trainer, module, batch, 0)
        return batch

    return mix


def _lam_and_partner(targets):
    """With one distinct label per sample (labels 0..N-1), a mixed row holds lam at its own class and 1 - lam at
    its partner's: read both back (an independent view of the draw)."""
    lam = targets.diagonal()
    return lam, (targets - torch.diag(lam)).argmax(1)


def test_training_batches_get_soft_mixed_targets_and_validation_batches_do_not(tmp_path):
    L.seed_everything(0, verbose=False)
    model = UserClassifier()
    train, val = _loaders()
    fast_trainer(tmp_path, max_epochs=4, callbacks=[MixUp(alpha=0.4)]).fit(model, train, val)
    train_targets = model.seen_targets["train"]
    assert all(t.shape == (16, 3) and torch.allclose(t.sum(1), torch.ones(16)) for t in train_targets)
    assert any(bool(((t > 0) & (t < 1)).any()) for t in train_targets)  # really mixed, not just one-hot
    assert all(t.ndim == 1 for t in model.seen_targets["val"])
    assert sum(model.train_losses[-3:]) < sum(model.train_losses[:3])


def test_dict_batches_and_keys(tmp_path):
    L.seed_everything(0, verbose=False)
    model = UserClassifier()
    train, _ = _loaders(as_dict=True)
    cb = MixUp(alpha=1.0, input_key="inputs", target_key="targets", per_sample=True)
    fast_trainer(tmp_path, max_steps=2, callbacks=[cb]).fit(model, train)
    assert model.seen_targets["train"][0].shape == (16, 3)
    # What the callback writes into a dict batch: each input row is the MixUp of its own row and its partner's
    # with the weights its target row holds; other keys are left as they are.
    x, meta = torch.randn(16, 5), torch.arange(16) * 10
    cb = MixUp(alpha=1.0, input_key="inputs", target_key="targets", per_sample=True, num_classes=16)
    batch = _set_up(tmp_path, cb)({"inputs": x, "targets": torch.arange(16), "meta": meta})
    assert set(batch) == {"inputs", "targets", "meta"}
    assert batch["meta"] is meta
    lam, index = _lam_and_partner(batch["targets"])
    assert torch.allclose(batch["targets"].sum(1), torch.ones(16))
    assert len(set(lam.tolist())) > 1  # per sample
    assert sorted(index.tolist()) == list(range(16))
    torch.testing.assert_close(batch["inputs"], lam[:, None] * x + (1 - lam[:, None]) * x[index])


def test_prob_zero_gives_one_hot_targets_and_last_epoch_stops_mixing(tmp_path):
    L.seed_everything(0, verbose=False)
    model = UserClassifier()
    fast_trainer(tmp_path, max_epochs=1, callbacks=[MixUp(prob=0.0)]).fit(model, _loaders()[0])
    assert all(set(t.unique().tolist()) == {0.0, 1.0} for t in model.seen_targets["train"])
    model = UserClassifier()
    fast_trainer(tmp_path, max_epochs=2, callbacks=[MixUp(last_epoch=1)]).fit(model, _loaders()[0])
    assert [t.ndim for t in model.seen_targets["train"]] == [2, 2, 2, 1, 1, 1]


def test_batch_size_one_is_not_mixed_with_one_warning_but_gets_smoothed_rows(tmp_path):
    L.seed_everything(0, verbose=False)
    model = UserClassifier()
    x, y = make_classification(8)
    y[7] = 1  # the trailing batch of one sample is of class 1 of 3
    loader = make_loader(x, y, batch_size=7)  # batches of 7 and 1
    with pytest.warns(UserWarning, match="skips batches of size 1") as record:
        fast_trainer(tmp_path, max_epochs=2, callbacks=[MixUp(label_smoothing=0.3)]).fit(model, loader)
    assert sum("skips batches" in str(w.message) for w in record) == 1
    seen = model.seen_targets["train"]
    assert [tuple(t.shape) for t in seen] == [(7, 3), (1, 3), (7, 3), (1, 3)]  # one kind of target per epoch
    assert torch.allclose(seen[1], torch.tensor([[0.1, 0.8, 0.1]]))


@pytest.mark.parametrize(
    "make_callback", [lambda: MixUp(prob=0.0, label_smoothing=0.3), lambda: CutMix(prob=0.0, label_smoothing=0.3)]
)
def test_batches_not_drawn_for_mixing_get_smoothed_rows(tmp_path, make_callback):
    L.seed_everything(0, verbose=False)
    model = UserClassifier(net=TinyCNN())
    x, y = make_images(16)
    fast_trainer(tmp_path, max_steps=2, callbacks=[make_callback()]).fit(model, make_loader(x, y, 8))
    for t, labels in zip(model.seen_targets["train"], y.split(8), strict=True):
        assert torch.allclose(t, F.one_hot(labels, 3).float() * 0.7 + 0.1)


def test_num_classes_comes_from_the_module_or_is_a_clear_error(tmp_path):
    class NoClasses(UserClassifier):
        def __init__(self):
            super().__init__()
            del self.num_classes

    with pytest.raises(ValueError, match=r"MixUp needs the number of classes.*MixUp\(num_classes=K\)"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp()]).fit(NoClasses(), _loaders()[0])
    model = NoClasses()
    fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(num_classes=3)]).fit(model, _loaders()[0])
    assert model.seen_targets["train"][0].shape == (16, 3)


class _HparamsOnly(UserClassifier):
    """A module that keeps the number of classes in its saved hyperparameters only (``save_hyperparameters``)."""

    def __init__(self, num_classes: object = 4) -> None:
        super().__init__(TinyMLP(num_classes=4), num_classes=4)
        del self.num_classes
        self.save_hyperparameters({"num_classes": num_classes})


def test_num_classes_comes_from_the_hyperparameters_after_the_attribute(tmp_path):
    model = _HparamsOnly()
    fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp()]).fit(model, _loaders()[0])
    assert model.seen_targets["train"][0].shape == (16, 4)


@pytest.mark.parametrize("bad", [None, 1, 2.0, True])
def test_a_missing_or_bad_number_of_classes_is_named_whole_with_the_module(tmp_path, bad):
    with pytest.raises(ValueError, match="MixUp needs") as raised:
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp()]).fit(_HparamsOnly(bad), _loaders()[0])
    assert str(raised.value) == (
        f"MixUp needs the number of classes to one-hot encode the targets, but got {bad!r} (from the argument, then "
        "`_HparamsOnly.num_classes`, then its hparams). Pass `MixUp(num_classes=K)` or set `self.num_classes = K` in "
        "your LightningModule."
    )


@pytest.mark.parametrize("bad", [1, 0, 2.0, 3.5, True, "3"])
def test_num_classes_argument_must_be_an_int_of_two_or_more(bad):
    with pytest.raises(ValueError, match="num_classes") as raised:
        MixUp(num_classes=bad)
    assert str(raised.value) == f"Expected `num_classes` to be an int >= 2 or None, but got {bad!r}."
    assert MixUp(num_classes=2).num_classes == 2


@pytest.mark.parametrize(
    ("batch", "kwargs", "error", "match"),
    [
        ((torch.zeros(2, 8), torch.tensor([0, 1])), {}, TypeError, "Cannot change a tuple batch in place"),
        ([torch.zeros(2, 8), torch.tensor([0, 1])], {"target_key": 2}, KeyError, "`target_key=2` is not a valid"),
        ({"x": torch.zeros(2, 8)}, {"input_key": "x", "target_key": "y"}, KeyError, r"keys \['x'\]"),
        ([torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.long)], {}, ValueError, r"Squeeze \(N, 1\)"),
        ([torch.zeros(3, 8), torch.tensor([0, 1])], {}, ValueError, "got 3 inputs .* and 2 targets"),
        (["text", torch.tensor([0, 1])], {}, TypeError, "inputs\\) to be a tensor"),
    ],
)
def test_bad_batches_are_clear_errors(tmp_path, batch, kwargs, error, match):
    cb = MixUp(num_classes=3, **kwargs)
    trainer = fast_trainer(tmp_path)
    cb.setup(trainer, UserClassifier(), "fit")
    with pytest.raises(error, match=match):
        cb.on_train_batch_start(trainer, UserClassifier(), batch, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": -1.0}, ValueError, "`alpha` to be a positive finite float, but got -1.0"),
        ({"prob": 2.0}, ValueError, r"`prob` to be a float in \[0, 1\]"),
        ({"label_smoothing": 1.0}, ValueError, "`label_smoothing`"),
        ({"num_classes": 1}, ValueError, "`num_classes` to be an int >= 2"),
        ({"last_epoch": -1}, ValueError, "`last_epoch`"),
        ({"input_key": 1.5}, TypeError, "`input_key` to be an int"),
        ({"layer": 3}, TypeError, "`layer` to be a submodule name"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        MixUp(**kwargs)


def test_state_dict_holds_only_tensors_and_ints_and_loads_with_weights_only(tmp_path):
    L.seed_everything(0, verbose=False)
    trainer = fast_trainer(tmp_path, max_steps=2, callbacks=[MixUp()])
    trainer.fit(UserClassifier(), _loaders()[0])
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("MixUp")]
    assert isinstance(state["generator_state"], torch.Tensor)
    assert isinstance(state["seed"], int)


def _fit(tmp_path, epochs, ckpt=None, save=None):
    L.seed_everything(7, verbose=False)
    model = UserClassifier()
    trainer = fast_trainer(tmp_path, max_epochs=epochs, callbacks=[MixUp(alpha=1.0, per_sample=True)])
    trainer.fit(model, _loaders()[0], ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return model


def test_crash_and_resume_draws_what_an_uninterrupted_run_draws(tmp_path):
    straight = _fit(tmp_path, 2)
    _fit(tmp_path, 1, save=tmp_path / "epoch1.ckpt")
    torch.manual_seed(123)  # a different global RNG must not matter: the callback owns its generator
    resumed = _fit(tmp_path, 2, ckpt=tmp_path / "epoch1.ckpt")
    for a, b in zip(straight.seen_targets["train"][3:], resumed.seen_targets["train"], strict=True):
        assert torch.equal(a, b)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


class _RecordTargets(L.Callback):
    def __init__(self, out_dir):
        self.out_dir, self.targets = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.targets.append(batch[1].tolist())

    def on_train_end(self, trainer, pl_module):
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.targets))


def _ddp_draws(tmp_path, make_callback):
    tmp_path.mkdir()
    L.seed_everything(0, verbose=False)
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(
            tmp_path, max_steps=2, use_distributed_sampler=False, callbacks=[make_callback(), _RecordTargets(tmp_path)]
        )
        model = UserClassifier(net=TinyCNN()) if make_callback is CutMix else UserClassifier()
        data = make_loader(*make_images(32), batch_size=16) if make_callback is CutMix else _loaders()[0]
        trainer.fit(model, data)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@skip_on_windows
@pytest.mark.parametrize("make_callback", [MixUp, CutMix])
def test_ddp_ranks_draw_differently_and_repeat_across_runs(tmp_path, make_callback):
    first = _ddp_draws(tmp_path / "a", make_callback)
    second = _ddp_draws(tmp_path / "b", make_callback)
    assert first[0] != first[1]  # same data on both ranks, different draws
    assert first == second


class _TokenNet(nn.Module):
    def __init__(self, vocab=10, dim=8, num_classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1))  # (N, T, D) -> (N, D)


def test_manifold_mixup_mixes_the_named_layer_output_for_token_inputs(tmp_path):
    L.seed_everything(0, verbose=False)
    tokens = torch.randint(0, 10, (32, 5))
    model = UserClassifier(net=_TokenNet())
    cb = MixUp(alpha=1.0, layer="net.embedding")
    fast_trainer(tmp_path, max_steps=2, callbacks=[cb]).fit(model, make_loader(tokens, torch.arange(32) % 3))
    assert model.seen_targets["train"][0].shape == (16, 3)
    x = tokens[:4]
    emb = model.net.embedding
    assert torch.equal(emb(x), F.embedding(x, emb.weight))  # after fit, the layer is left unhooked
    # In a step, the layer's output is the MixUp of its plain outputs with the pairing the targets show, once.
    net = _TokenNet(num_classes=4)
    cb = MixUp(alpha=1.0, layer="net.embedding", num_classes=4)
    _, targets = _set_up(tmp_path, cb, UserClassifier(net=net, num_classes=4))([x, torch.arange(4)])
    lam, index = _lam_and_partner(targets)
    mixed = net.embedding(x)
    plain = net.embedding(x)  # the hook is removed after one call
    assert torch.equal(plain, F.embedding(x, net.embedding.weight))
    torch.testing.assert_close(mixed, lam[:, None, None] * plain + (1 - lam[:, None, None]) * plain[index])


def test_unknown_layer_lists_the_module_names(tmp_path):
    with pytest.raises(ValueError, match=r"no submodule of that name.*'net.embedding'"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(layer="embed")]).fit(
            UserClassifier(net=_TokenNet()), make_loader(torch.randint(0, 10, (8, 5)), torch.arange(8) % 3)
        )


class _SparseUser(SparseMixingMixin, UserClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_targets["train"].append(y)
        loss = self.mixed_cross_entropy(self(x), y)
        self.train_losses.append(float(loss.detach()))
        return loss


@pytest.mark.parametrize("per_sample", [False, True])
def test_sparse_targets_give_the_same_losses_as_dense_targets(tmp_path, per_sample):
    losses = []
    for cls in (UserClassifier, _SparseUser):
        L.seed_everything(0, verbose=False)
        model = cls()
        callbacks = [MixUp(alpha=1.0, per_sample=per_sample), LabelSmoothing(0.1)]
        fast_trainer(tmp_path, max_steps=3, callbacks=callbacks).fit(model, _loaders()[0])
        losses.append(model.train_losses)
    assert isinstance(model.seen_targets["train"][0], MixedTargets)
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5)


def test_mixup_targets_work_with_plain_cross_entropy():
    y = LF.one_hot(torch.tensor([0, 1]), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert F.cross_entropy(torch.zeros(2, 3), y).item() == pytest.approx(torch.log(torch.tensor(3.0)).item())


def test_pairings_train_alike_and_inplace_gives_the_same_batches(tmp_path):
    losses = {}
    for name, kwargs in {
        "default": {},
        "inplace": {"inplace": True},
        "permutation": {"pairing": "permutation"},
    }.items():
        L.seed_everything(0, verbose=False)
        model = UserClassifier()
        fast_trainer(tmp_path, max_steps=3, callbacks=[MixUp(alpha=1.0, **kwargs)]).fit(model, _loaders()[0])
        losses[name] = model.train_losses
    assert losses["inplace"] == pytest.approx(losses["default"], abs=1e-6)  # same draws, gather vs shift path
    assert len(losses["permutation"]) == 3


def test_permutation_pairing_mixes_each_sample_with_a_random_other_sample(tmp_path):
    # Labels 0..N-1 show the pairing in the targets; the inputs must be the MixUp of exactly that pairing, the
    # pairing a derangement (nobody with itself), and not always a roll of the batch (what "shift" draws).
    x = torch.randn(8, 5)
    mix = _set_up(tmp_path, MixUp(alpha=1.0, pairing="permutation", num_classes=8))
    rolls = [torch.arange(8).roll(-k) for k in range(8)]
    not_rolls = 0
    for _ in range(20):
        inputs, targets = mix([x, torch.arange(8)])
        lam, index = _lam_and_partner(targets)
        assert sorted(index.tolist()) == list(range(8))
        assert bool((index != torch.arange(8)).all())
        torch.testing.assert_close(inputs, lam[:, None] * x + (1 - lam[:, None]) * x[index])
        not_rolls += not any(torch.equal(index, r) for r in rolls)
    assert not_rolls >= 15  # a random derangement of 8 is a roll with probability 7 / 14833


class _KeepsBatches(UserClassifier):
    """A user who keeps every training batch's inputs and targets (and copies of their values at the time)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.kept = []

    def training_step(self, batch, batch_idx):
        self.kept.append([(t, t.clone()) for t in batch[:2]])
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("make_callback", [lambda: MixUp(1.0), lambda: CutMix(1.0, per_sample=True)])
def test_batches_a_user_keeps_are_never_overwritten_by_later_batches(tmp_path, make_callback):
    L.seed_everything(0, verbose=False)
    model = _KeepsBatches(net=TinyCNN())
    fast_trainer(tmp_path, max_epochs=2, callbacks=[make_callback()]).fit(model, make_loader(*make_images(32), 8))
    assert len(model.kept) == 8
    for entry in range(2):  # inputs, then the (N, K) targets
        pairs = [step[entry] for step in model.kept]
        assert all(torch.equal(kept, copy) for kept, copy in pairs)
        assert len({kept.data_ptr() for kept, _ in pairs}) == 8  # each batch got its own memory


def test_mixed_batches_reuse_memory_only_when_nobody_holds_the_last_one(tmp_path):
    x = torch.randn(4, 3)
    mix = _set_up(tmp_path, MixUp(1.0))

    def mixed_inputs():
        return mix([x, torch.tensor([0, 1, 2, 0])])[0]

    ptr = mixed_inputs().data_ptr()
    assert mixed_inputs().data_ptr() == ptr  # the last one was dropped at once: its memory is reused
    # Whatever still refers to the memory blocks reuse: the tensor, a view, a detached alias, numpy, a graph.
    holders = [
        lambda t: t,
        lambda t: t[1:],
        lambda t: t.detach(),
        lambda t: t.numpy(),
        lambda t: (t * torch.ones(3, requires_grad=True)).sum().grad_fn,  # autograd saved `t` for backward
    ]
    for hold in holders:
        held = mixed_inputs()
        copy, ptr = held.clone(), held.data_ptr()
        kept = hold(held)
        del held
        assert mixed_inputs().data_ptr() != ptr  # new memory; the held batch is left alone
        if not hasattr(kept, "next_functions"):  # a tensor or an array: its values are those of the batch it was
            assert torch.equal(torch.as_tensor(kept), torch.as_tensor(hold(copy)))
        del kept
    assert mix([torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0])])[0].grad_fn is not None


def test_a_pickled_callback_carries_no_batch_memory(tmp_path):
    import pickle

    cb = MixUp(1.0)
    mix = _set_up(tmp_path, cb)
    before = len(pickle.dumps(cb))  # its settings and generator state
    mix([torch.randn(4, 1000), torch.tensor([0, 1, 2, 0])])  # 16 kB of mixed inputs, now reused memory
    assert len(pickle.dumps(cb)) - before < 1000


class _EpochMetrics(L.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mixup/")})


def test_mixed_fraction_and_mean_lambda_are_logged_per_epoch(tmp_path):
    L.seed_everything(0, verbose=False)
    model = UserClassifier()
    record = _EpochMetrics()
    x, y = make_classification(64)
    loader = make_loader(x, y % 2, batch_size=16)  # two classes among three: partner class visible in targets
    cb = MixUp(alpha=1.0, prob=0.5, last_epoch=3)
    fast_trainer(tmp_path, max_epochs=4, callbacks=[cb, record]).fit(model, loader)
    targets = model.seen_targets["train"]
    mixed = [bool(((t > 0) & (t < 1)).any()) for t in targets]  # a mixed batch has soft rows (lam in (0, 1))
    for epoch in range(3):
        logged = record.epochs[epoch]
        flags = mixed[4 * epoch : 4 * epoch + 4]
        assert logged["mixup/mixed_fraction"] == pytest.approx(sum(flags) / 4)
        # lambda is the weight of each sample's own class where the partner's class differs; 1 when unmixed.
        lams = []
        for t, yy in zip(targets[4 * epoch : 4 * epoch + 4], (y % 2).split(16), strict=True):
            own = t[torch.arange(16), yy]
            lams.append(float(own[own < 1].max()) if bool((own < 1).any()) else 1.0)
        assert 0 < logged["mixup/lambda"] <= 1
        assert logged["mixup/lambda"] == pytest.approx(sum(lams) / 4, abs=1e-6)
    assert record.epochs[3] == {"mixup/mixed_fraction": 0.0, "mixup/lambda": 1.0}  # from last_epoch on


def test_generator_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match="used before `setup`: let the Trainer run `fit`"):
        _ = MixUp().generator


def test_a_layer_that_returns_no_tensor_or_does_not_run_is_reported(tmp_path):
    class _Pair(nn.Module):
        def forward(self, x):
            return x, x

    class _Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.unused, self.head = _Pair(), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.pair(x)[0])

    loader = _loaders()[0]
    with pytest.raises(TypeError, match=r"MixUp\(layer='net.pair'\) expects that submodule to return one tensor"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(layer="net.pair")]).fit(UserClassifier(net=_Net()), loader)
    with pytest.warns(UserWarning, match="the layer did not run in the training step; nothing was mixed"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(layer="net.unused")]).fit(
            UserClassifier(net=_Net()), loader
        )


# --- issue 12, point 2: a second fit continues the stream --------------------------------------------------------
def test_a_second_fit_continues_the_stream_instead_of_replaying_it(tmp_path):
    L.seed_everything(0, verbose=False)
    straight = UserClassifier()
    fast_trainer(tmp_path, max_epochs=2, callbacks=[MixUp(alpha=1.0, per_sample=True)]).fit(straight, _loaders()[0])
    L.seed_everything(0, verbose=False)
    model, cb = UserClassifier(), MixUp(alpha=1.0, per_sample=True)
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[cb])
    trainer.fit(model, _loaders()[0])
    trainer.fit_loop.max_epochs = 2  # raise max_epochs and fit again on the same Trainer and callback
    trainer.fit(model, _loaders()[0])
    first, second = model.seen_targets["train"][:3], model.seen_targets["train"][3:]
    assert len(second) == 3
    assert not any(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # not a replay of epoch 1
    # Mixed targets depend on the labels and the draws only: the second fit draws what epoch 2 of one fit draws.
    for a, b in zip(straight.seen_targets["train"][3:], second, strict=True):
        assert torch.equal(a, b)
    # A second fine-tuning stage on a new Trainer with the same callback continues the stream too.
    fast_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model, _loaders()[0])
    assert not any(torch.equal(a, b) for a, b in zip(first, model.seen_targets["train"][6:], strict=True))


# --- issue 12, point 3: SparseMixingMixin with two mixing callbacks ------------------------------------------------
def test_sparse_targets_refuse_two_mixing_callbacks_at_fit_start(tmp_path):
    model = _SparseUser(net=TinyCNN())
    with pytest.raises(ValueError, match=r"MixUp and CutMix would each mix.*SparseMixingMixin.*MixUpCutMix"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(1.0), CutMix(1.0)]).fit(
            model, make_loader(*make_images(16), 8)
        )
    assert model.seen_targets["train"] == []  # refused before the first batch


def test_sparse_targets_that_are_mixed_already_are_not_mixed_again():
    cb = CutMix(num_classes=3)
    trainer = fast_trainer()
    cb.setup(trainer, _SparseUser(), "fit")
    mixed = MixedTargets(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0.6, 0.6]), 0.0, 3)
    with pytest.raises(ValueError, match="mixed already"):
        cb.on_train_batch_start(trainer, _SparseUser(), [torch.zeros(2, 1, 4, 4), mixed], 0)


# --- issue 12, point 4: integer inputs ------------------------------------------------------------------------------
def test_mixup_refuses_token_ids_and_names_layer(tmp_path):
    tokens = torch.randint(0, 10, (16, 5))
    with pytest.raises(TypeError, match=r"dtype torch.int64.*token ids.*MixUp\(layer="):
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(1.0)]).fit(
            UserClassifier(net=_TokenNet()), make_loader(tokens, torch.arange(16) % 3, 8)
        )


def test_mixup_still_blends_uint8_images(tmp_path):
    cb = MixUp(1.0, num_classes=3)
    trainer = fast_trainer()
    cb.setup(trainer, UserClassifier(), "fit")
    x = torch.tensor([[0, 200], [100, 50]], dtype=torch.uint8)
    batch = [x, torch.tensor([0, 1])]
    cb.on_train_batch_start(trainer, UserClassifier(), batch, 0)
    lam = float(batch[1][0, 0])
    assert batch[0].dtype == torch.uint8
    assert abs(float(batch[0][0, 1]) - (200 * lam + 50 * (1 - lam))) <= 0.5 + 1e-4  # the partner is [100, 50]


# --- issue 12, point 6: two mixers warn; smoothing losses detected ---------------------------------------------------
def test_mixup_and_cutmix_on_one_trainer_warn_once_naming_mixup_cutmix(tmp_path):
    with pytest.warns(
        UserWarning, match=r"MixUp and CutMix are all on this Trainer.*mixed 2 times.*MixUpCutMix"
    ) as rec:
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(1.0), CutMix(1.0)]).fit(
            UserClassifier(net=TinyCNN()), make_loader(*make_images(16), 8)
        )
    assert sum("MixUpCutMix" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():  # a mixer with LabelSmoothing is not a double mix
        warnings.filterwarnings("error", message=".*all on this Trainer.*")
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(1.0), LabelSmoothing(0.1)]).fit(
            UserClassifier(), _loaders()[0]
        )


class _SmoothingLoss(UserClassifier):
    def __init__(self, smoothing=0.1):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.criterion(self(x), y)


def test_a_smoothing_loss_held_by_the_module_is_a_second_smoothing_source(tmp_path):
    with pytest.raises(ValueError, match=r"MixUp\(label_smoothing=0.2\), _SmoothingLoss.criterion = CrossEntropyLoss"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(label_smoothing=0.2)]).fit(_SmoothingLoss(), _loaders()[0])
    from timm.loss import LabelSmoothingCrossEntropy

    model = UserClassifier()
    model.criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    with pytest.raises(ValueError, match=r"LabelSmoothingCrossEntropy\(smoothing=0.1\)"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[LabelSmoothing(0.1)]).fit(model, _loaders()[0])
    # The loss's own smoothing alone is one source: fine.
    fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(1.0)]).fit(_SmoothingLoss(), _loaders()[0])
    fast_trainer(tmp_path, max_steps=1, callbacks=[MixUp(label_smoothing=0.1)]).fit(_SmoothingLoss(0.0), _loaders()[0])


# --- issue 12, point 7: a typo in layer= --------------------------------------------------------------------------
def test_a_typo_in_layer_names_the_closest_submodules_only():
    import timm

    class _Vit(UserClassifier):
        def __init__(self):
            super().__init__(net=timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=12))

    model = _Vit()
    assert len(list(model.named_modules())) > 150
    with pytest.raises(ValueError, match=r"Did you mean 'net.patch_embed'") as info:
        MixUp(layer="net.patch_embd").setup(fast_trainer(), model, "fit")
    assert len(str(info.value)) < 400  # a short message, not 200 module names
    with pytest.raises(ValueError, match=r"Did you mean 'net.blocks.3.attn'"):
        MixUp(layer="net.blocks.3.atn").setup(fast_trainer(), model, "fit")
    with pytest.raises(ValueError, match="No name is close"):
        MixUp(layer="typo").setup(fast_trainer(), model, "fit")


# --- issue 20, points 8 and 9: no host sync, no blocking copy per batch --------------------------------------------
_MIXERS = {
    "mixup": lambda: MixUp(1.0, num_classes=3),
    "mixup per_sample": lambda: MixUp(1.0, num_classes=3, per_sample=True, pairing="permutation"),
    "mixup elem": lambda: MixUp(1.0, num_classes=3, mode="elem", prob=0.5),
    "cutmix": lambda: CutMix(1.0, num_classes=3, pairing="permutation"),
    "cutmix per_sample": lambda: CutMix(1.0, num_classes=3, per_sample=True),
    "mixup_cutmix elem": lambda: MixUpCutMix(num_classes=3, mode="elem", label_smoothing=0.1),
    "mixup_cutmix pair": lambda: MixUpCutMix(num_classes=3, mode="pair", pairing="permutation"),
    "label_smoothing": lambda: LabelSmoothing(0.1, num_classes=3),
}


@pytest.mark.parametrize("name", list(_MIXERS))
def test_batches_on_a_device_are_mixed_without_reading_any_device_value(name):
    # On the meta device every read of a value (`.item()`, `int()`, `bool()`, `.tolist()`, a copy to the host)
    # raises: a batch that passes has no host sync. Only the first batch of an epoch checks the labels (on CPU here).
    cb = _MIXERS[name]()
    trainer, module = fast_trainer(), UserClassifier(net=TinyCNN())
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_start(trainer, module)
    x, y = make_images(8)
    cb.on_train_batch_start(trainer, module, [x, y], 0)  # validates the labels once (a host read, on the CPU)
    for i in range(3):
        batch = [x.to("meta"), y.to("meta")]
        cb.on_train_batch_start(trainer, module, batch, i + 1)
        assert batch[1].device.type == "meta"
        assert batch[1].shape == (8, 3)
        assert batch[0].device.type == "meta"
        assert batch[0].shape == x.shape


def test_labels_out_of_range_are_a_clear_error_on_cpu_on_every_batch_and_once_per_epoch_on_devices():
    from lightning_reg.functional._targets import mixed_one_hot

    y = torch.tensor([0, 1, 3])
    for fn in (
        lambda v: LF.one_hot(y, 3, validate=v),
        lambda v: mixed_one_hot(y, 3, 0.5, torch.tensor([1, 2, 0]), validate=v),
    ):
        for validate in (True, False):  # on the CPU the scatter checks for free
            with pytest.raises(ValueError, match=r"indices in \[0, 3\).*\[0, 3\]"):
                fn(validate)
    cb = MixUp(1.0, num_classes=3)
    trainer, module = fast_trainer(), UserClassifier()
    cb.setup(trainer, module, "fit")
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):  # the first batch of an epoch validates
        cb.on_train_batch_start(trainer, module, [torch.zeros(3, 8), y], 0)


def test_draws_reach_a_cuda_device_through_pinned_memory_without_blocking(monkeypatch):
    params = LF.sample_mixup(3, 1.0, generator=torch.Generator().manual_seed(0))  # lam a float: one tensor to move
    calls = []

    def fake_pin(self):
        calls.append("pin")
        return self

    def fake_to(self, *args, **kwargs):
        calls.append(("to", str(args[0]), kwargs.get("non_blocking")))
        return self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    params.to(torch.device("cuda"))
    assert calls == ["pin", ("to", "cuda", True)]


# --- issue 20, point 10: one lambda for inputs and targets under bf16 ---------------------------------------------
@pytest.mark.parametrize("mode", ["batch", "elem", "pair"])
def test_bf16_inputs_and_targets_get_the_same_per_sample_lambda(mode):
    cb = MixUp(1.0, num_classes=2, per_sample=True, mode=mode)
    trainer, module = fast_trainer(), UserClassifier()
    cb.setup(trainer, module, "fit")
    # Sample 0 holds ones (class 1), its only partner zeros (class 0): the blend is lerp(0, 1, lam) = lam, exact in
    # bf16 when lam is a bf16 number, so the pixel shows the lambda the inputs got; the target the one they got.
    x = torch.stack([torch.ones(4), torch.zeros(4)]).to(torch.bfloat16)
    rounded = 0
    for step in range(30):
        batch = [x, torch.tensor([1, 0])]
        cb.on_train_batch_start(trainer, module, batch, step)
        pixel, own = float(batch[0][0, 0]), float(batch[1][0, 1])
        assert pixel == own  # before: the target kept the float32 lambda, off by up to 2e-3
        rounded += own != float(torch.tensor(own, dtype=torch.float32).to(torch.bfloat16).float()) or own not in (0, 1)
    assert rounded > 0  # lambdas were really drawn (not all 0 or 1)


def test_bf16_batch_lambda_is_the_same_for_inputs_and_targets_to_float32_precision():
    # One lambda per batch is a Python float: torch's bf16 lerp computes in float32 with it, as the targets do.
    cb = MixUp(1.0, num_classes=2)
    trainer, module = fast_trainer(), UserClassifier()
    cb.setup(trainer, module, "fit")
    x = torch.stack([torch.ones(4), torch.zeros(4)]).to(torch.bfloat16)
    for step in range(10):
        batch = [x, torch.tensor([1, 0])]
        cb.on_train_batch_start(trainer, module, batch, step)
        own = float(batch[1][0, 1])
        assert float(batch[0][0, 0]) == float(torch.tensor(own).to(torch.bfloat16))  # the bf16 result of that lam


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_MIXERS))
def test_cuda_batches_make_no_host_sync_and_match_the_cpu_batches(name):
    # torch raises on any synchronizing call (a blocking copy, `.item()`, `nonzero`) while the debug mode is "error".
    x, y = make_images(16)
    results = []
    for device in ("cpu", "cuda"):
        L.seed_everything(0, verbose=False)
        cb = _MIXERS[name]()
        trainer, module = fast_trainer(), UserClassifier(net=TinyCNN()).to(device)
        cb.setup(trainer, module, "fit")
        cb.on_train_epoch_start(trainer, module)
        cb.on_train_batch_start(trainer, module, [x.to(device), y.to(device)], 0)  # validates the labels once
        batch = [x.to(device), y.to(device)]
        torch.cuda.synchronize()
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            cb.on_train_batch_start(trainer, module, batch, 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append([t.cpu() for t in batch])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-6)  # the same draws on both devices


class _RecordMixed(L.Callback):
    """Records the mixed training inputs (after the mixing callback, which runs first)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].clone())


def test_a_state_loaded_before_fit_is_where_the_stream_continues(tmp_path):
    # Loading a state into a fresh callback by hand, before `fit` (not Lightning's resume, which loads after
    # setup), must continue that stream: the draws equal the second epoch of one uninterrupted run.
    x, y = make_classification(32)

    def run(callback, epochs):
        L.seed_everything(0, verbose=False)
        record = _RecordMixed()
        loader = make_loader(x, y, 8)  # unshuffled: the same batches every epoch
        fast_trainer(tmp_path, max_epochs=epochs, callbacks=[callback, record]).fit(UserClassifier(), loader)
        return record.inputs

    straight = run(MixUp(alpha=1.0), 2)
    first = MixUp(alpha=1.0)
    run(first, 1)
    fresh = MixUp(alpha=1.0)
    fresh.load_state_dict(first.state_dict())
    continued = run(fresh, 1)
    assert len(continued) == 4
    for a, b in zip(straight[4:], continued, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(straight[0], continued[0])  # not a restart of the stream


class _GeneratorAtEpochStart(L.Callback):
    def __init__(self, mixing):
        self.mixing, self.states = mixing, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.states.append(self.mixing.generator.get_state().clone())


def test_resume_with_another_prob_keeps_the_generator_state(tmp_path):
    # The state key names the class and batch entries, not `prob` or `alpha`: a run resumed with other values
    # finds its generator state in the checkpoint and continues that stream.
    loader = make_loader(*make_classification(32), 8)
    first = MixUp(alpha=1.0)
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[first])
    trainer.fit(UserClassifier(), loader)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    saved = first.generator.get_state()
    resumed = MixUp(alpha=0.4, prob=0.5)
    record = _GeneratorAtEpochStart(resumed)
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[resumed, record])
    trainer.fit(UserClassifier(), loader, ckpt_path=tmp_path / "one.ckpt")
    assert resumed.state_key == first.state_key
    assert torch.equal(record.states[0], saved)


# --- layer= suggestions, layer outputs, in-place mixing, the state key -------------------------------------------


def _tree(names):
    """A module whose submodules are exactly ``names`` (dotted) and their parents."""
    root = nn.Module()
    for name in names:
        node = root
        for part in name.split("."):
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
    return root


class _Named(UserClassifier):
    def __init__(self, names):
        super().__init__()
        self.net = _tree(names)


def _suggestions(typo, names):
    with pytest.raises(ValueError, match="has no submodule of that name") as raised:
        MixUp(layer=typo, num_classes=3).setup(fast_trainer(), _Named(names), "fit")
    message = str(raised.value)
    return message.split("Did you mean ")[1].split("? `layer`")[0].split(" or ") if "Did you mean" in message else []


def test_a_typo_is_answered_with_the_five_closest_names_best_first():
    names = [f"blocks.{i}" for i in range(8)]
    assert _suggestions("block.1", names) == [
        "'net.blocks.1'",
        "'net.blocks.7'",
        "'net.blocks.6'",
        "'net.blocks.5'",
        "'net.blocks.4'",
    ]


def test_a_typo_in_the_last_part_of_a_long_name_is_matched_on_the_last_parts():
    names = ["stages.3.transformer_blocks.embedding", "stages.3.transformer_blocks.norm", "head"]
    assert _suggestions("model.encoder.embeding", names) == ["'net.stages.3.transformer_blocks.embedding'"]
    many = [f"stages.3.transformer_blocks.embed{i}" for i in range(6)]
    expected = [f"'net.stages.3.transformer_blocks.embed{i}'" for i in (5, 4, 3, 2, 1)]
    assert _suggestions("model.encoder.embedd", many) == expected
    assert _suggestions("model.encoder.zzz", many) == []


class _Scores(nn.Module):
    """A layer whose output has one value per row: ``(N,)``."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(8, 1)
        self.head = nn.Linear(1, 3)

    def forward(self, x):
        s = self.score(x).squeeze(1)  # (N,)
        return self.head(s[:, None])


class _ScoreLayer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).squeeze(1)


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_layer_with_one_value_per_row_is_mixed_with_each_rows_lambda(tmp_path, per_sample):
    net = _Scores()
    net.score = _ScoreLayer(nn.Linear(8, 1))
    net.forward = lambda x: net.head(net.score(x)[:, None])
    module = UserClassifier(net=net, num_classes=3)
    cb = MixUp(1.0, layer="net.score", num_classes=3, per_sample=per_sample)
    mix = _set_up(tmp_path, cb, module)
    x = torch.randn(6, 8)
    state = cb.generator.get_state()
    mix([x, torch.arange(6) % 3])
    seen = []
    handle = net.score.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    clean = net.score.inner(x).squeeze(1).detach()
    module(x)
    handle.remove()
    g = torch.Generator()
    g.set_state(state)
    params = LF.sample_mixup(6, 1.0, per_sample=per_sample, generator=g)
    torch.testing.assert_close(seen[0], params.lam * clean + (1 - params.lam) * clean[params.index])


def test_a_layer_that_returns_something_else_is_named_whole(tmp_path):
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Flat(nn.Module):
        def forward(self, x):
            return x.reshape(-1)  # (N * 8,): rows lost

    for layer, got in ((Pair(), "tuple"), (Flat(), "a tensor of shape (48,)")):
        net = nn.Sequential(layer, nn.Identity())
        module = UserClassifier(net=net, num_classes=3)
        mix = _set_up(tmp_path, MixUp(1.0, layer="net.0", num_classes=3), module)
        mix([torch.randn(6, 8), torch.arange(6) % 3])
        with pytest.raises(TypeError, match="expects that submodule") as raised:
            module(torch.randn(6, 8))
        assert str(raised.value) == (
            "MixUp(layer='net.0') expects that submodule to return one tensor (N, ...) with N=6, but it returned "
            f"{got}. Pick a layer that outputs a tensor."
        )


def test_inplace_mixing_overwrites_the_batch_tensor_with_the_values_of_a_new_one_as_batches_change(tmp_path):
    ours, reference = MixUp(1.0, num_classes=3, inplace=True), MixUp(1.0, num_classes=3)
    mix, mix_reference = _set_up(tmp_path, ours), _set_up(tmp_path, reference)
    reference.generator.set_state(ours.generator.get_state())
    for shape, dtype in (
        ((6, 8), torch.float32),
        ((4, 8), torch.float32),
        ((4, 8), torch.float64),
        ((6, 2, 4), torch.float64),
    ):
        x = torch.randn(*shape, dtype=dtype)
        y = torch.arange(shape[0]) % 3
        expected = mix_reference([x.clone(), y])
        batch = mix([x, y])
        assert batch[0] is x  # the loader's tensor itself, changed
        torch.testing.assert_close(x, expected[0], rtol=0, atol=1e-6)


def test_the_state_key_names_the_mixed_layer():
    assert MixUp(layer="net.embed").state_key == "MixUp{'input_key': 0, 'target_key': 1, 'layer': 'net.embed'}"
    assert MixUp().state_key == "MixUp{'input_key': 0, 'target_key': 1, 'layer': None}"
