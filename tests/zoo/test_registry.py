import pytest

import zoo


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown zoo model 'cnn_smal'\. Did you mean 'cnn_small'"):
        zoo.create("cnn_smal")


def test_registry_names_the_issue_asks_for():
    assert {"cnn_small", "resnet18", "lstm", "gru", "transformer", "vit_tiny"} <= set(zoo.list_models())


def test_unknown_model_error_says_timm_names_work_too():
    with pytest.raises(ValueError, match=r"or any `timm.list_models\(\)` name"):
        zoo.create("no_such_model_anywhere")


def test_registry_kwargs_override_the_defaults():
    model = zoo.create("lstm", num_classes=4, hidden_size=8, bidirectional=True)
    assert model.hparams.cell == "lstm"
    assert model.hparams.hidden_size == 8
    assert model.net.num_features == 16
