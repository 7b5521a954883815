import math

import pytest
import torch
from torch import nn

import zoo
from zoo.transformer import Transformer


def _attention(**kwargs):
    """The attention of a one-block Transformer: timm's ``Attention`` as the zoo configures it."""
    return Transformer(3, dim=8, depth=1, num_heads=2, dropout=0.0, **kwargs).blocks[0].attn


def test_attention_matches_the_textbook_formula():
    torch.manual_seed(0)
    attn = _attention().eval()
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected)


def test_active_attention_dropout_drops_the_attention_weights_through_its_module():
    torch.manual_seed(0)
    attn = _attention(attn_dropout=0.5).train()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    calls = []
    attn.attn_drop.register_forward_hook(lambda module, args, out: calls.append(out))
    torch.manual_seed(1)
    out = attn(x, attn_mask=mask[:, None, None, :])
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.manual_seed(1)
    weights = torch.nn.functional.dropout(scores.softmax(dim=-1), 0.5)
    torch.testing.assert_close(out, attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 8)))
    assert len(calls) == 1


def test_attention_dropout_follows_its_dropout_module_for_mc_sampling():
    torch.manual_seed(0)
    net = Transformer(3, dim=8, depth=1, num_heads=2, dropout=0.0, attn_dropout=0.5).eval()
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(net(x), net(x))  # eval: deterministic
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.train()  # what MC-dropout sampling does: only the dropout modules go back to training mode
    assert not torch.allclose(net(x), net(x))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_is_masked_with_lengths(pooling):
    torch.manual_seed(0)
    net = Transformer(3, dim=8, depth=2, num_heads=2, pooling=pooling).eval()
    short, long = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    padded = torch.cat([torch.cat([short, torch.full((1, 2, 8), 7.0)], dim=1), long])
    batched = net(padded, torch.tensor([3, 5]))
    torch.testing.assert_close(batched[0], net(short)[0])
    torch.testing.assert_close(batched[1], net(long)[0])


def test_tokens_and_images_inputs():
    tokens = Transformer(4, vocab_size=30, dim=8, depth=1, num_heads=2, max_len=10)
    assert tokens(torch.randint(30, (2, 10))).shape == (2, 4)
    vit = zoo.TransformerClassifier(4, image_size=8, patch_size=2, in_channels=1, dim=8, depth=1, num_heads=2)
    assert vit.net.pos_embed.shape == (1, 16 + 1, 8)  # 16 patches and the [CLS] token
    assert vit(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_drop_path_grows_linearly_over_the_blocks():
    net = Transformer(3, dim=8, depth=3, num_heads=2, drop_path=0.2)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in net.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_position_embeddings_and_cls_token_get_no_weight_decay():
    model = zoo.TransformerClassifier(dim=8, depth=1, num_heads=2)
    decay, no_decay = model.parameter_groups()
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.net.pos_embed) in no_decay_ids
    assert id(model.net.cls_token) in no_decay_ids
    assert all(p.ndim >= 2 for p in decay["params"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pooling": "max"}, r"one of \('cls', 'mean'\)"),
        ({"dim": 10, "num_heads": 4}, "divisible by `num_heads`"),
        ({"vocab_size": 10, "image_size": 8}, "at most one of `vocab_size`"),
        ({"image_size": 10, "patch_size": 4}, "to divide `image_size`"),
        ({"attn_dropout": 1.0}, "attn_dropout"),
        ({"depth": 0}, "depth"),
    ],
)
def test_transformer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoo.TransformerClassifier(3, **kwargs)


def test_transformer_input_errors_say_what_was_expected():
    with pytest.raises(ValueError, match=r"Expected float vectors of shape \(N, T, 8\)"):
        Transformer(3, dim=8, depth=1, num_heads=2)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="at most `max_len`=4 steps"):
        Transformer(3, dim=8, depth=1, num_heads=2, max_len=4)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"Expected images of shape \(N, \*\(1, 8, 8\)\)"):
        zoo.TransformerClassifier(3, image_size=8, patch_size=2, in_channels=1, dim=8, depth=1, num_heads=2)(
            torch.randn(2, 3, 8, 8)
        )
    with pytest.raises(ValueError, match=r"Expected token ids"):
        Transformer(3, vocab_size=5, dim=8, depth=1, num_heads=2)(torch.randn(2, 5))


def test_mc_dropout_prediction_samples_the_transformer_dropout():
    from lightning_reg.functional import mc_dropout_predict

    torch.manual_seed(0)
    model = zoo.TransformerClassifier(dim=8, depth=1, num_heads=2, dropout=0.0, attn_dropout=0.3).eval()
    prediction = mc_dropout_predict(model, torch.randn(3, 6, 8), n_samples=8)
    assert prediction.probs.shape == (8, 3, 10)
    assert prediction.probs.std(dim=0).max() > 0  # attention dropout alone makes the samples differ
    assert not model.net.blocks[0].attn.attn_drop.training  # modes restored


def test_an_attention_mask_batch_equals_the_lengths_batch_and_the_steps_use_it():
    torch.manual_seed(0)
    model = zoo.TransformerClassifier(3, dim=16, depth=1, num_heads=2).eval()
    x, y, lengths = torch.randn(4, 6, 8), torch.tensor([0, 1, 2, 0]), torch.tensor([6, 3, 2, 1])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()  # 1 at real tokens (HuggingFace)
    assert model.forward_inputs([x, y, mask]).keys() == {"x", "attention_mask"}
    by_lengths, _ = model.forward_batch([x, y, lengths])
    by_mask, _ = model.forward_batch([x, y, mask])
    torch.testing.assert_close(by_mask, by_lengths)
    x_changed = x.clone()
    x_changed[1, 3:] = 100.0  # the padding: ignored
    torch.testing.assert_close(model.forward_batch([x_changed, y, mask])[0], by_mask)
    with pytest.raises(ValueError, match="at most one of `lengths` and `attention_mask`"):
        model(x, lengths, attention_mask=mask)
    with pytest.raises(ValueError, match=r"Expected `attention_mask` of shape \(4, 6\)"):
        model(x, attention_mask=mask[:, :5])


def test_vit_tiny_is_timms_vit_tiny_on_32x32_images_in_4x4_patches():
    import timm
    from timm.models.vision_transformer import VisionTransformer

    model = zoo.create("vit_tiny", num_classes=10)
    assert isinstance(model.net, VisionTransformer)
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)
    assert {k: v.shape for k, v in model.net.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.net.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 12).tolist())


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vit_attention_dropout_follows_its_dropout_module_and_the_head_split(pooling):
    torch.manual_seed(0)
    kwargs = {"image_size": 8, "patch_size": 2, "in_channels": 1, "dim": 8, "depth": 1, "num_heads": 2}
    model = zoo.TransformerClassifier(3, **kwargs, dropout=0.0, attn_dropout=0.5, pooling=pooling).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x), model(x))  # eval: deterministic
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    assert model.net.cls_token is None if pooling == "mean" else model.net.cls_token.shape == (1, 1, 8)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()  # only the dropout modules, as a user's own MC-dropout loop would do
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pooling": "max"}, r"one of \('cls', 'mean'\)"),
        ({"dim": 10, "num_heads": 4}, "divisible by `num_heads`"),
        ({"depth": 0}, "depth"),
        ({"drop_path": 1.0}, "drop_path"),
    ],
)
def test_vit_rejects_bad_arguments_like_the_sequence_transformer(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoo.TransformerClassifier(3, image_size=8, patch_size=2, **kwargs)
