"""Transformer classifiers: our pre-LayerNorm encoder for token and vector sequences, timm's ViT for images."""

from __future__ import annotations

from typing import Any, Literal, cast, get_args

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from zoo.classifier import ClassifierModule

__all__ = ["Transformer", "TransformerClassifier", "TransformerPooling"]

TransformerPooling = Literal["cls", "mean"]
_POOLINGS: tuple[str, ...] = get_args(TransformerPooling)


def _check_encoder(pooling: str, dim: int, depth: int, num_heads: int, **rates: float) -> None:
    """The checks shared by the sequence Transformer and the ViT."""
    if pooling not in _POOLINGS:
        raise ValueError(f"Expected `pooling` to be one of {_POOLINGS}, but got {pooling!r}.")
    for name, size in (("dim", dim), ("depth", depth)):
        if size < 1:
            raise ValueError(f"Expected `{name}` >= 1, but got {size!r}.")
    if dim % num_heads != 0:
        raise ValueError(f"Expected `dim` divisible by `num_heads`, but got dim={dim} and num_heads={num_heads}.")
    for name, p in rates.items():
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Expected `{name}` in [0, 1), but got {p!r}.")


def _attention_dropout_through_its_module(model: nn.Module) -> None:
    """Make timm's attention call its ``attn_drop`` module wherever that module drops something.

    timm's fused path passes ``dropout_p=self.attn_drop.p if self.training`` to SDPA and never calls ``attn_drop``
    (timm/layers/attention.py), so switching the ``nn.Dropout`` modules back on in an evaluating model (what
    Monte-Carlo dropout does) would leave attention deterministic. The explicit path computes the same function
    and applies ``attn_drop`` as a module; it runs only where the rate is above 0.
    """
    for module in model.modules():
        attn_drop = getattr(module, "attn_drop", None)
        if hasattr(module, "fused_attn") and isinstance(attn_drop, nn.Dropout) and attn_drop.p > 0:
            cast(Any, module).fused_attn = False  # a plain attribute (timm annotates it `Final` for TorchScript)


class Transformer(nn.Module):
    """A pre-LayerNorm Transformer encoder classifier for float vectors or token ids, on timm's ViT blocks.

    Float vectors ``(N, T, input_size)`` go through a linear layer, token ids ``(N, T)`` (``vocab_size`` set)
    through an ``nn.Embedding``; then learned position embeddings, an optional ``[CLS]`` token, ``depth`` of
    timm's ``Block`` (attention and MLP, pre-LayerNorm, with padding masked), a final LayerNorm, ``[CLS]`` or
    mean pooling over the real steps, and a dropout + linear head. Images go to timm's ``VisionTransformer``
    (:class:`TransformerClassifier` with ``image_size``).

    Every dropout is reachable by Monte-Carlo dropout: embedding, residual and attention dropout are
    ``nn.Dropout`` modules that run as modules, and drop path is timm's ``DropPath``.

    Args:
        num_classes: output classes.
        input_size: features per step of float vector inputs (ignored for tokens).
        vocab_size: when set, inputs are token ids.
        max_len: longest sequence (size of the position table).
        dim: embedding width.
        depth: number of blocks.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width over ``dim``.
        dropout: dropout on the embeddings and on each residual branch (attention output and MLP).
        attn_dropout: dropout on the attention weights.
        drop_path: stochastic depth rate of the last block, increasing linearly from 0 over the blocks.
        head_dropout: dropout on the pooled features, before the classifier.
        pooling: ``"cls"`` (a learned ``[CLS]`` token) or ``"mean"`` (over the real positions).

    Example:
        >>> Transformer(10, input_size=8, dim=16, depth=1, num_heads=2)(torch.randn(2, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        input_size: int = 8,
        vocab_size: int | None = None,
        max_len: int = 512,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        head_dropout: float = 0.0,
        pooling: TransformerPooling = "cls",
    ) -> None:
        super().__init__()
        rates = {"dropout": dropout, "attn_dropout": attn_dropout, "drop_path": drop_path, "head_dropout": head_dropout}
        _check_encoder(pooling, dim, depth, num_heads, **rates)
        for name, size in (("input_size", input_size), ("max_len", max_len)):
            if size < 1:
                raise ValueError(f"Expected `{name}` >= 1, but got {size!r}.")
        self.input_size = input_size
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.pooling = pooling
        self.embed: nn.Module = nn.Embedding(vocab_size, dim) if vocab_size is not None else nn.Linear(input_size, dim)
        extra = 1 if pooling == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pooling == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len + extra, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(dropout)
        drop_paths = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=attn_dropout, drop_path=rate)
            for rate in drop_paths
        )
        _attention_dropout_through_its_module(self)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(dim, num_classes))
        self.num_features = dim

    def no_weight_decay(self) -> set[str]:
        """The position embeddings and the ``[CLS]`` token (timm's hook)."""
        return {"pos_embed", "cls_token"}

    def _embed(self, x: Tensor) -> Tensor:
        if self.vocab_size is not None:
            if x.ndim != 2 or x.is_floating_point():
                raise ValueError(
                    f"Expected token ids of shape (N, T) and an integer dtype, but got shape {tuple(x.shape)} and "
                    f"dtype {x.dtype}."
                )
        elif x.ndim != 3 or x.shape[-1] != self.input_size or not x.is_floating_point():
            raise ValueError(
                f"Expected float vectors of shape (N, T, {self.input_size}), but got shape {tuple(x.shape)} and dtype "
                f"{x.dtype}; set `vocab_size` for token ids, or `image_size` of TransformerClassifier for images."
            )
        if x.shape[1] > self.max_len:
            raise ValueError(f"Expected at most `max_len`={self.max_len} steps, but got {x.shape[1]}; raise `max_len`.")
        return self.embed(x)  # (N, T, dim)

    def forward_features(
        self, x: Tensor, lengths: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Pooled, normalized features ``(N, dim)``; padding of variable-length batches is masked.

        Args:
            x: the inputs.
            lengths: real steps per sequence ``(N,)``.
            attention_mask: or a mask ``(N, T)``, nonzero (True) at real steps (the HuggingFace convention).
        """
        x = self._embed(x)  # (N, T, dim)
        n, t, _ = x.shape
        mask = None
        if lengths is not None and attention_mask is not None:
            raise ValueError("Expected at most one of `lengths` and `attention_mask`, but got both.")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=x.device)
            mask = torch.arange(t, device=x.device)[None, :] < lengths[:, None]  # (N, T), True at real steps
        if attention_mask is not None:
            if attention_mask.shape != (n, t):
                raise ValueError(
                    f"Expected `attention_mask` of shape ({n}, {t}), but got {tuple(attention_mask.shape)}."
                )
            mask = attention_mask.to(device=x.device) != 0  # (N, T)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)  # (N, 1 + T, dim)
            if mask is not None:
                mask = torch.cat([mask.new_ones(n, 1), mask], dim=1)
        x = self.pos_drop(x + self.pos_embed[:, : x.shape[1]])
        attn_mask = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, T): broadcast over heads, queries
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        x = self.norm(x)
        if self.cls_token is not None:
            return x[:, 0]
        if mask is None:
            return x.mean(dim=1)
        return (x * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(features)

    def forward(self, x: Tensor, lengths: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x, lengths, attention_mask))


class TransformerClassifier(ClassifierModule):
    """The zoo Transformer as a LightningModule: :class:`Transformer` on sequences, timm's ViT on images.

    With ``image_size`` set the network is timm's ``VisionTransformer`` on square images in ``patch_size`` patches
    (``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``; ``dropout``
    is its ``pos_drop_rate`` and ``proj_drop_rate``, ``attn_dropout`` its ``attn_drop_rate``, ``drop_path`` its
    ``drop_path_rate``, ``head_dropout`` its ``drop_rate``, ``pooling`` its ``global_pool``), and the split is
    timm's: ``forward_features`` gives the normalized tokens, ``forward_head`` pools them. Otherwise see
    :class:`Transformer` for the arguments. Position embeddings and the ``[CLS]`` token get no weight decay, like
    biases and norm gains. ``**optim`` are :class:`~zoo.classifier.ClassifierModule`'s optimization arguments.

    Example:
        >>> model = TransformerClassifier(num_classes=10, dim=16, depth=1, num_heads=2)
        >>> model(torch.randn(4, 8, 8)).shape
        torch.Size([4, 10])
        >>> vit = TransformerClassifier(10, image_size=8, patch_size=2, in_channels=1, dim=16, depth=1, num_heads=2)
        >>> type(vit.net).__name__, vit(torch.randn(2, 1, 8, 8)).shape
        ('VisionTransformer', torch.Size([2, 10]))
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        input_size: int = 8,
        vocab_size: int | None = None,
        image_size: int | None = None,
        patch_size: int = 4,
        in_channels: int = 3,
        max_len: int = 512,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        head_dropout: float = 0.0,
        pooling: TransformerPooling = "cls",
        **optim: Any,
    ) -> None:
        super().__init__(num_classes, **optim)
        self.save_hyperparameters()
        self.net: Transformer | VisionTransformer
        self.image_shape: tuple[int, int, int] | None = None
        if image_size is None:
            self.net = Transformer(
                num_classes,
                input_size=input_size,
                vocab_size=vocab_size,
                max_len=max_len,
                dim=dim,
                depth=depth,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                dropout=dropout,
                attn_dropout=attn_dropout,
                drop_path=drop_path,
                head_dropout=head_dropout,
                pooling=pooling,
            )
            return
        if vocab_size is not None:
            raise ValueError(
                f"Expected at most one of `vocab_size` (token ids) and `image_size` (images), but got "
                f"vocab_size={vocab_size} and image_size={image_size}; leave both None for float vectors."
            )
        if patch_size < 1 or image_size % patch_size != 0:
            raise ValueError(
                f"Expected `patch_size` to divide `image_size`, but got patch_size={patch_size} and "
                f"image_size={image_size}."
            )
        rates = {"dropout": dropout, "attn_dropout": attn_dropout, "drop_path": drop_path, "head_dropout": head_dropout}
        _check_encoder(pooling, dim, depth, num_heads, **rates)
        self.image_shape = (in_channels, image_size, image_size)
        self.net = VisionTransformer(
            img_size=image_size,
            patch_size=patch_size,
            in_chans=in_channels,
            num_classes=num_classes,
            global_pool="token" if pooling == "cls" else "avg",
            class_token=pooling == "cls",
            fc_norm=False,  # the final LayerNorm before pooling, for both poolings
            embed_dim=dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_rate=head_dropout,
            pos_drop_rate=dropout,
            proj_drop_rate=dropout,
            attn_drop_rate=attn_dropout,
            drop_path_rate=drop_path,
        )
        _attention_dropout_through_its_module(self.net)

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Pooled features ``(N, dim)`` of sequences, or the normalized tokens ``(N, tokens, dim)`` of images.

        For sequences ``args`` may hold the batch's ``lengths`` and ``attention_mask=`` a mask; for images this is
        timm's ``forward_features``.
        """
        if self.image_shape is None:
            return self.net.forward_features(x, *args, **kwargs)
        if args or kwargs:
            raise ValueError("Expected only images for a ViT (`image_size` is set), but got lengths or a mask too.")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"Expected images of shape (N, *{self.image_shape}), but got {tuple(x.shape)}.")
        return self.net.forward_features(x)

    def forward_inputs(self, batch: Any) -> tuple[Any, ...] | dict[str, Any]:
        """``(inputs, lengths)`` of ``[inputs, targets, lengths]``; ``{"x", "attention_mask"}`` for a mask ``(N, T)``.

        The third entry of a batch is read by its shape: lengths ``(N,)`` or an attention mask ``(N, T)`` (1 at real
        tokens, the HuggingFace convention).
        """
        if isinstance(batch, list | tuple) and len(batch) == 3 and isinstance(batch[2], Tensor) and batch[2].ndim == 2:
            return {"x": batch[0], "attention_mask": batch[2]}
        return super().forward_inputs(batch)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``: the head of the features (for images: pooling, head dropout, classifier)."""
        return self.net.forward_head(features)

    def no_weight_decay(self) -> set[str]:
        """The position embeddings and the ``[CLS]`` token (the network's own ``no_weight_decay``)."""
        return {f"net.{name}" for name in self.net.no_weight_decay()}
