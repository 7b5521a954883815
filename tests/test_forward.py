import pytest
import torch
from torch import Tensor, nn

from lightning_reg.forward import ForwardInputs, batch_inputs, batch_logits, validate_forward_fn


class MaskedModel(nn.Module):
    """A model whose forward needs a mask, as a HuggingFace-style text model does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids) * attention_mask[..., None]
        return self.fc(h.sum(1) / attention_mask.sum(1, keepdim=True))

    def forward_inputs(self, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _text_batch() -> dict:
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).float(), "labels": torch.tensor([0, 2])}


def test_module_forward_inputs_reach_forward_as_keywords():
    model, batch = MaskedModel(), _text_batch()
    expected = model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(batch_logits(model, batch), expected)


def test_forward_fn_overrides_the_module_method():
    model, batch = MaskedModel(), _text_batch()
    ones = torch.ones_like(batch["attention_mask"])
    logits = batch_logits(model, batch, forward_fn=lambda m, b: m(b["input_ids"], ones))
    torch.testing.assert_close(logits, model(batch["input_ids"], ones))


def test_without_forward_inputs_the_input_key_entry_is_the_one_argument():
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    torch.testing.assert_close(batch_logits(model, [torch.zeros(1), x], input_key=1), model(x))
    torch.testing.assert_close(batch_logits(model, x), model(x))


def test_tuple_from_forward_inputs_is_positional():
    class WithLengths(nn.Module):
        def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
            return x[:, : int(lengths.max())].sum(1, keepdim=True)

        def forward_inputs(self, batch: list) -> tuple:
            return batch[0], batch[2]

    batch = [torch.ones(2, 5), torch.zeros(2), torch.tensor([2, 3])]
    torch.testing.assert_close(batch_logits(WithLengths(), batch), torch.full((2, 1), 3.0))


def test_forward_inputs_map_touches_tensors_only_and_keeps_batch_size():
    inputs = ForwardInputs((torch.zeros(2, 3), 7), {"mask": torch.ones(2, 3)})
    repeated = inputs.map(lambda t: t.repeat(3, *([1] * (t.dim() - 1))))
    assert repeated.args[1] == 7
    assert repeated.batch_size == 6
    assert repeated.kwargs["mask"].shape == (6, 3)


def test_bad_forward_inputs_return_and_bad_forward_fn_are_clear_errors():
    class Bad(nn.Module):
        def forward_inputs(self, batch: object) -> int:
            return 3

    with pytest.raises(TypeError, match="forward_inputs\\(batch\\)` to return a tuple"):
        batch_inputs(Bad(), [torch.zeros(1)])
    with pytest.raises(TypeError, match="return the logits as a tensor"):
        batch_logits(nn.Linear(2, 2), [torch.zeros(1, 2)], forward_fn=lambda m, b: (m(b[0]),))
    with pytest.raises(TypeError, match="callable `forward_fn"):
        validate_forward_fn(3)
