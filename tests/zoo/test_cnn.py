import pytest
import torch
from torch import nn

from zoo.cnn import CNN, make_norm2d


@pytest.mark.parametrize("norm", ["batch", "instance", "layer", "group", "none"])
def test_cnn_forward_backward_for_every_norm(norm):
    net = CNN(10, widths=(8, 16), norm=norm, spatial_dropout=0.1)
    out = net(torch.randn(4, 1, 8, 8))
    out.sum().backward()
    assert out.shape == (4, 10)


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (28, 1), (32, 3)])
def test_cnn_handles_digits_mnist_and_cifar_sizes(size, channels):
    net = CNN(10, in_channels=channels, widths=(8, 16, 32))
    assert net(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_cnn_head_split_matches_forward_in_eval():
    net = CNN(10, widths=(8, 16), dropout=0.5).eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(net.forward_head(net.forward_features(x)), net(x))


def test_cnn_dropout_lives_in_the_head_only_without_spatial_dropout():
    net = CNN(10, widths=(8,), dropout=0.5)
    assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in net.features.modules())
    assert any(isinstance(m, nn.Dropout) for m in net.head.modules())


def test_make_norm2d_layer_normalizes_each_sample_over_all_features():
    norm = make_norm2d("layer", 4)
    y = norm(torch.randn(2, 4, 3, 3) * 5 + 2)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "batchnorm"}, r"one of \('batch', 'instance', 'layer', 'group', 'none'\)"),
        ({"widths": ()}, "widths"),
        ({"depth": 0}, "depth"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_cnn_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CNN(10, **kwargs)
