import pytest
import torch

from lightning_reg._batch import get_entry, set_entry, validate_key


def test_set_entry_replaces_list_item_in_place():
    batch = [torch.zeros(2), torch.ones(2)]
    set_entry(batch, 1, torch.full((2,), 5.0))
    assert batch[1].tolist() == [5.0, 5.0]


def test_set_entry_replaces_dict_key_in_place():
    batch = {"image": torch.zeros(2), "label": torch.ones(2)}
    set_entry(batch, "label", torch.zeros(2))
    assert batch["label"].tolist() == [0.0, 0.0]


def test_set_entry_on_tuple_batch_says_how_to_fix_it():
    with pytest.raises(TypeError, match=r"Cannot change a tuple batch in place.*Return a list"):
        set_entry((torch.zeros(1), torch.zeros(1)), 0, torch.ones(1))


def test_get_entry_missing_dict_key_lists_the_keys():
    with pytest.raises(KeyError, match=r"keys \['image', 'label'\].*`target_key='y'`"):
        get_entry({"image": 1, "label": 2}, "y", "target_key")


def test_get_entry_position_out_of_range():
    with pytest.raises(KeyError, match=r"length 2.*`input_key=5`"):
        get_entry([1, 2], 5, "input_key")


def test_get_entry_rejects_non_batch_types():
    with pytest.raises(TypeError, match=r"list `\[inputs, targets, \.\.\.\]` or a dict, but got Tensor"):
        get_entry(torch.zeros(3), 0)


@pytest.mark.parametrize("key", [1.5, None, True])
def test_validate_key_rejects_non_int_non_str(key):
    with pytest.raises(TypeError, match="Expected `input_key` to be an int"):
        validate_key(key, "input_key")
