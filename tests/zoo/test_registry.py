import pytest

import zoo


def test_registry_builds_every_model():
    for name in zoo.list_models():
        assert isinstance(zoo.create(name, num_classes=4), zoo.ClassifierModule)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown zoo model 'cnn_smal'\. Did you mean 'cnn_small'"):
        zoo.create("cnn_smal")
