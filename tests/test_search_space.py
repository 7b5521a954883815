"""The search space: paths resolved in a complete config, distributions, grid values and how values are applied."""

from __future__ import annotations

import pytest

from lightning_reg.search.space import SearchSpace, SearchSpaceError

CONFIG = {
    "seed_everything": 0,
    "model": {"class_path": "zoo.CNNClassifier", "init_args": {"dropout": 0.3, "widths": [32, 64], "lr": 0.003}},
    "trainer": {
        "max_epochs": 3,
        "callbacks": [
            {"class_path": "lightning_reg.MixUp", "init_args": {"alpha": 0.2}},
            {"class_path": "lightning_reg.LabelSmoothing", "init_args": {"smoothing": 0.1}},
        ],
    },
}


class FakeTrial:
    """Answers Optuna's suggest_* with the first value, recording what was asked."""

    def __init__(self):
        self.asked = {}

    def suggest_float(self, name, low, high, *, log=False, step=None):
        self.asked[name] = ("float", low, high, log, step)
        return low

    def suggest_int(self, name, low, high, *, log=False, step=1):
        self.asked[name] = ("int", low, high, log, step)
        return low

    def suggest_categorical(self, name, choices):
        self.asked[name] = ("categorical", list(choices))
        return choices[-1]


def test_short_and_canonical_paths_and_callbacks_by_name_or_index_resolve_to_the_same_values():
    space = SearchSpace(
        {
            "model.dropout": [0.1],
            "model.init_args.lr": [0.1],
            "trainer.callbacks.MixUp.alpha": [0.5],
            "trainer.callbacks.1.init_args.smoothing": [0.0],
            "trainer.max_epochs": [5],
        }
    ).resolve(CONFIG)
    assert [d.path for d in space.distributions] == [
        ("model", "init_args", "dropout"),
        ("model", "init_args", "lr"),
        ("trainer", "callbacks", 0, "init_args", "alpha"),
        ("trainer", "callbacks", 1, "init_args", "smoothing"),
        ("trainer", "max_epochs"),
    ]
    out = space.apply(CONFIG, {d.name: d.choices[0] for d in space.distributions})
    assert out["model"]["init_args"] == {"dropout": 0.1, "widths": [32, 64], "lr": 0.1}
    assert [c["init_args"] for c in out["trainer"]["callbacks"]] == [{"alpha": 0.5}, {"smoothing": 0.0}]
    assert out["trainer"]["max_epochs"] == 5
    assert CONFIG["model"]["init_args"]["dropout"] == 0.3  # the base config is left alone


def test_two_spellings_of_one_value_are_refused():
    with pytest.raises(SearchSpaceError, match=r"'model.init_args.dropout' and 'model.dropout' name the same"):
        SearchSpace({"model.dropout": [0.1], "model.init_args.dropout": [0.2]}).resolve(CONFIG)


def test_a_callback_is_switched_off_by_a_false_presence_and_later_indices_stay_right():
    space = SearchSpace(
        {"trainer.callbacks.MixUp": [True, False], "trainer.callbacks.LabelSmoothing.smoothing": [0.2]}
    ).resolve(CONFIG)
    assert space.distributions[0].kind == "presence"
    out = space.apply(CONFIG, {"trainer.callbacks.MixUp": False, "trainer.callbacks.LabelSmoothing.smoothing": 0.2})
    assert out["trainer"]["callbacks"] == [
        {"class_path": "lightning_reg.LabelSmoothing", "init_args": {"smoothing": 0.2}}
    ]
    kept = space.apply(CONFIG, {"trainer.callbacks.MixUp": True})
    assert kept["trainer"]["callbacks"] == CONFIG["trainer"]["callbacks"]


def test_a_whole_callback_with_non_boolean_choices_or_a_range_is_refused():
    with pytest.raises(SearchSpaceError, match="must be true/false"):
        SearchSpace({"trainer.callbacks.MixUp": [0.1, 0.2]}).resolve(CONFIG)
    with pytest.raises(SearchSpaceError, match=r"search one of its arguments \(trainer.callbacks.MixUp.<argument>\)"):
        SearchSpace({"trainer.callbacks.MixUp": {"type": "float", "low": 0.1, "high": 0.2}}).resolve(CONFIG)


def test_list_choices_travel_to_optuna_as_yaml_text_and_come_back_as_lists():
    space = SearchSpace({"model.widths": {"type": "categorical", "choices": [[16, 32], [32, 64]]}}).resolve(CONFIG)
    trial = FakeTrial()
    assert space.suggest(trial) == {"model.widths": [32, 64]}
    assert trial.asked["model.widths"] == ("categorical", ["[16, 32]", "[32, 64]"])
    assert space.decode({"model.widths": "[16, 32]"}) == {"model.widths": [16, 32]}
    assert space.grid() == {"model.widths": ["[16, 32]", "[32, 64]"]}


def test_distributions_reach_optuna_with_their_arguments():
    space = SearchSpace(
        {
            "model.dropout": {"type": "float", "low": 0.1, "high": 0.5, "step": 0.1},
            "model.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "trainer.max_epochs": {"type": "int", "low": 2, "high": 8, "step": 2},
        }
    ).resolve(CONFIG)
    trial = FakeTrial()
    space.suggest(trial)
    assert trial.asked == {
        "model.dropout": ("float", 0.1, 0.5, False, 0.1),
        "model.lr": ("float", 1e-4, 1e-1, True, None),
        "trainer.max_epochs": ("int", 2, 8, False, 2),
    }


def test_grid_values_of_stepped_ranges_and_the_grid_size():
    space = SearchSpace(
        {
            "model.dropout": {"type": "float", "low": 0.1, "high": 0.5, "step": 0.1},
            "trainer.max_epochs": {"type": "int", "low": 2, "high": 8, "step": 3},
            "model.lr": [0.1, 0.01],
        }
    ).resolve(CONFIG)
    assert space.grid() == {
        "model.dropout": [0.1, 0.2, 0.3, 0.4, 0.5],
        "trainer.max_epochs": [2, 5, 8],
        "model.lr": [0.1, 0.01],
    }
    assert space.size() == 5 * 3 * 2


def test_corners_hold_every_extreme_and_every_choice():
    space = SearchSpace(
        {"model.dropout": {"type": "float", "low": 0.1, "high": 0.5}, "model.lr": [0.1, 0.01, 0.001]}
    ).resolve(CONFIG)
    corners = list(space.corners())
    assert {c["model.dropout"] for c in corners} == {0.1, 0.5}
    assert [c["model.lr"] for c in corners] == [0.1, 0.01, 0.001]


def test_an_unknown_path_inside_the_callbacks_lists_what_is_there():
    with pytest.raises(SearchSpaceError, match=r"trainer.callbacks holds 2 entries: 0 \(MixUp\), 1 \(LabelSmoothing\)"):
        SearchSpace({"trainer.callbacks.CutMix.alpha": [0.1]}).resolve(CONFIG)
    with pytest.raises(SearchSpaceError, match=r"model.init_args.dropout is a value \(0.3\), not a section"):
        SearchSpace({"model.dropout.rate": [0.1]}).resolve(CONFIG)


def test_a_value_listed_twice_is_refused():
    with pytest.raises(SearchSpaceError, match="lists a value twice"):
        SearchSpace({"model.dropout": [0.1, 0.1]}).resolve(CONFIG)


@pytest.mark.parametrize(
    ("config", "space", "names"),
    [
        ("examples/configs/cnn_small_digits.yaml", "examples/search/dropout_grid.yaml", ["model.dropout"]),
        (
            "examples/search/cnn_small_digits_mixup.yaml",
            "examples/search/regularization_tpe.yaml",
            ["model.dropout", "model.weight_decay", "trainer.callbacks.MixUp.alpha"],
        ),
    ],
)
def test_the_example_spaces_fit_their_configs(config, space, names):
    from pathlib import Path

    from lightning_reg.search.study import _check_values_fit_config, complete_config

    root = Path(__file__).parents[1]
    base = complete_config(["--config", str(root / config)])
    search_space = SearchSpace.from_file(root / space).resolve(base)
    _check_values_fit_config(base, search_space)
    assert search_space.names == names
    if "grid" in space:
        assert search_space.grid() == {"model.dropout": [0.1, 0.2, 0.3, 0.4, 0.5]}
