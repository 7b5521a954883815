"""Pre-LayerNorm Transformer encoders for token, vector and image (patch) inputs: a small ViT."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from zoo.classifier import ClassifierModule, split_decay_parameters

__all__ = ["Attention", "Block", "Transformer", "TransformerClassifier", "TransformerPooling"]

TransformerPooling = Literal["cls", "mean"]
_POOLINGS: tuple[str, ...] = get_args(TransformerPooling)


class Attention(nn.Module):
    """Multi-head self-attention with attention and output dropout; fused ``scaled_dot_product_attention`` in eval.

    Attention dropout is a plain ``nn.Dropout`` module, ``attn_drop``, applied to the attention weights. When it is
    active (its own ``training`` flag set and ``p > 0``) the weights are computed explicitly and passed through it;
    otherwise the fused ``F.scaled_dot_product_attention`` kernel runs. Both give the same function. So attention
    dropout follows ``model.train()``/``model.eval()`` as usual, and Monte-Carlo dropout, which switches dropout
    modules back on inside an evaluating model (and may watch them with hooks), reaches it like any other dropout.

    Example:
        >>> attn = Attention(16, num_heads=4, attn_dropout=0.1)
        >>> attn(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, dim: int, num_heads: int, *, attn_dropout: float = 0.0, proj_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Expected `dim` divisible by `num_heads`, but got dim={dim} and num_heads={num_heads}.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend over ``x`` ``(N, T, C)``; ``mask`` ``(N, T)`` is True at the positions that may be attended."""
        n, t, c = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, N, h, T, hs)
        q, k, v = qkv.unbind(0)  # each (N, h, T, hs)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, T), broadcast over heads and queries
        if self.attn_drop.training and self.attn_drop.p > 0:
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, h, T, T)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            y = self.attn_drop(scores.softmax(dim=-1)) @ v  # (N, h, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, h, T, hs)
        y = y.transpose(1, 2).reshape(n, t, c)
        return self.proj_drop(self.proj(y))


class Block(nn.Module):
    """A pre-LayerNorm encoder block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``.

    Example:
        >>> Block(16, num_heads=2, drop_path=0.1)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(N, T, C)`` to ``(N, T, C)``."""
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A pre-LayerNorm Transformer encoder classifier for vectors, token ids or images.

    The input decides the embedding: float vectors ``(N, T, input_size)`` go through a linear layer, token ids
    ``(N, T)`` (``vocab_size`` set) through an ``nn.Embedding``, images ``(N, C, H, W)`` (``image_size`` set)
    through a ``patch_size`` convolution into patches, as in ViT. Learned position embeddings, optional
    ``[CLS]`` token, ``depth`` blocks, a final LayerNorm, ``[CLS]`` or mean pooling, and a dropout + linear head.

    Dropout everywhere is reachable by Monte-Carlo dropout: residual, embedding and attention dropout are
    ``nn.Dropout`` modules that run as modules (see :class:`Attention`), and drop path is timm's ``DropPath``,
    which follows its own ``training`` flag.

    Args:
        num_classes: output classes.
        input_size: features per step of float vector inputs (ignored for tokens and images).
        vocab_size: when set, inputs are token ids.
        image_size: when set, inputs are square images of this side; with ``patch_size`` and ``in_channels``.
        patch_size: side of the square patches (must divide ``image_size``).
        in_channels: image channels.
        max_len: longest sequence for vectors and tokens (size of the position table).
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
        >>> vit = Transformer(10, image_size=8, patch_size=2, in_channels=1, dim=16, depth=1, num_heads=2)
        >>> vit(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int,
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
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        head_dropout: float = 0.0,
        pooling: TransformerPooling = "cls",
    ) -> None:
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f"Expected `pooling` to be one of {_POOLINGS}, but got {pooling!r}.")
        if vocab_size is not None and image_size is not None:
            raise ValueError(
                f"Expected at most one of `vocab_size` (token ids) and `image_size` (images), but got "
                f"vocab_size={vocab_size} and image_size={image_size}; leave both None for float vectors."
            )
        for name, size in (("input_size", input_size), ("dim", dim), ("depth", depth), ("max_len", max_len)):
            if size < 1:
                raise ValueError(f"Expected `{name}` >= 1, but got {size!r}.")
        if dim % num_heads != 0:
            raise ValueError(f"Expected `dim` divisible by `num_heads`, but got dim={dim} and num_heads={num_heads}.")
        for name, p in (
            ("dropout", dropout),
            ("attn_dropout", attn_dropout),
            ("drop_path", drop_path),
            ("head_dropout", head_dropout),
        ):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"Expected `{name}` in [0, 1), but got {p!r}.")
        self.input_size = input_size
        self.image_size = image_size
        self.in_channels = in_channels
        self.pooling = pooling
        self.embed: nn.Module
        if image_size is not None:
            if patch_size < 1 or image_size % patch_size != 0:
                raise ValueError(
                    f"Expected `patch_size` to divide `image_size`, but got patch_size={patch_size} and "
                    f"image_size={image_size}."
                )
            self.embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)  # (N, dim, H/p, W/p)
            max_len = (image_size // patch_size) ** 2
        elif vocab_size is not None:
            self.embed = nn.Embedding(vocab_size, dim)
        else:
            self.embed = nn.Linear(input_size, dim)
        self.max_len = max_len
        self.vocab_size = vocab_size
        extra = 1 if pooling == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pooling == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len + extra, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(dropout)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, dropout=dropout, attn_dropout=attn_dropout, drop_path=rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(dim, num_classes))
        self.num_features = dim

    def _embed(self, x: Tensor) -> Tensor:
        if self.image_size is not None:
            expected = (self.in_channels, self.image_size, self.image_size)
            if x.ndim != 4 or tuple(x.shape[1:]) != expected:
                raise ValueError(f"Expected images of shape (N, *{expected}), but got {tuple(x.shape)}.")
            return self.embed(x).flatten(2).transpose(1, 2)  # (N, P, dim)
        if self.vocab_size is not None:
            if x.ndim != 2 or x.is_floating_point():
                raise ValueError(
                    f"Expected token ids of shape (N, T) and an integer dtype, but got shape {tuple(x.shape)} and "
                    f"dtype {x.dtype}."
                )
        elif x.ndim != 3 or x.shape[-1] != self.input_size or not x.is_floating_point():
            raise ValueError(
                f"Expected float vectors of shape (N, T, {self.input_size}), but got shape {tuple(x.shape)} and dtype "
                f"{x.dtype}; set `vocab_size` for token ids or `image_size` for images."
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
        for block in self.blocks:
            x = block(x, mask)
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
    """The zoo Transformer as a LightningModule (see :class:`Transformer` for the architecture arguments).

    Position embeddings and the ``[CLS]`` token get no weight decay, like biases and norm gains.

    Example:
        >>> model = TransformerClassifier(num_classes=10, dim=16, depth=1, num_heads=2)
        >>> model(torch.randn(4, 8, 8)).shape
        torch.Size([4, 10])
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
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.0,
        warmup_fraction: float = 0.05,
        scheduler: str = "cosine",
    ) -> None:
        super().__init__(
            num_classes,
            lr=lr,
            weight_decay=weight_decay,
            label_smoothing=label_smoothing,
            warmup_fraction=warmup_fraction,
            scheduler=scheduler,
        )
        self.save_hyperparameters()
        self.net = Transformer(
            num_classes,
            input_size=input_size,
            vocab_size=vocab_size,
            image_size=image_size,
            patch_size=patch_size,
            in_channels=in_channels,
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

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Pooled features ``(N, dim)``; ``args`` may hold the batch's ``lengths``, ``attention_mask=`` a mask."""
        return self.net.forward_features(x, *args, **kwargs)

    def forward_inputs(self, batch: Any) -> tuple[Any, ...] | dict[str, Any]:
        """``(inputs, lengths)`` of ``[inputs, targets, lengths]``; ``{"x", "attention_mask"}`` for a mask ``(N, T)``.

        The third entry of a batch is read by its shape: lengths ``(N,)`` or an attention mask ``(N, T)`` (1 at real
        tokens, the HuggingFace convention).
        """
        if isinstance(batch, list | tuple) and len(batch) == 3 and isinstance(batch[2], Tensor) and batch[2].ndim == 2:
            return {"x": batch[0], "attention_mask": batch[2]}
        return super().forward_inputs(batch)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.net.forward_head(features)

    def parameter_groups(self) -> Iterable[dict[str, Any]]:
        """Like the base, with the position embeddings and ``[CLS]`` token moved to the undecayed group."""
        decay, no_decay = split_decay_parameters(self)
        exempt = {id(p) for p in (self.net.pos_embed, self.net.cls_token) if p is not None}
        return [
            {"params": [p for p in decay if id(p) not in exempt], "weight_decay": self.weight_decay},
            {"params": no_decay + [p for p in decay if id(p) in exempt], "weight_decay": 0.0},
        ]
