"""A small encoder–decoder Transformer for sequence-to-sequence tasks (Vaswani et al. 2017, "Attention Is All You
Need", arXiv 1706.03762), built on :class:`torch.nn.Transformer`.

One token embedding is shared by the source and the target (joint vocabulary), scaled by √d_model and summed with
sinusoidal (the paper's) or learned positions; the decoder sees a causal mask and both sides a padding mask
(token id ``pad_id``). ``forward(src, tgt_in)`` returns next-token logits ``(B, T, V)``. LPF-SGD's Table 7
"mini-Transformer" is ``d_model=512, nhead=8, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=512``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flatlit.models.registry import register_model
from flatlit.utils.errors import ConfigError

POSITIONS = ("sinusoidal", "learned")


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The paper's table: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)), shape (length, d)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class Seq2SeqTransformer(nn.Module):
    """Encoder–decoder Transformer over a joint vocabulary.

    Args:
        vocab_size: tokens in the joint vocabulary (the output size).
        max_len: longest sequence (positions table size; sinusoidal positions grow past it on demand).
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: as
            :class:`torch.nn.Transformer`.
        positions: ``sinusoidal`` or ``learned`` position embeddings.
        norm_first: pre-LayerNorm blocks (post-LN, the paper's, by default).
        tie_output: the output projection shares the token embedding's weights.
        pad_id: the padding token (masked in attention; its embedding gets no gradient).
    """

    input_kind = "tokens"  # forward(src, tgt_in) with integer token tensors, not images

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 256,
        d_model: int = 64,
        nhead: int = 4,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        positions: str = "sinusoidal",
        norm_first: bool = False,
        tie_output: bool = False,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ConfigError(
                f"model.init_args.arch_kwargs.positions: one of {', '.join(POSITIONS)}, got {positions!r}."
            )
        if d_model % nhead:
            raise ConfigError(f"model.init_args.arch_kwargs: d_model={d_model} must be divisible by nhead={nhead}.")
        self.vocab_size, self.max_len, self.d_model, self.pad_id = vocab_size, max_len, d_model, pad_id
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)  # unit variance after the √d_model scaling
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        if positions == "learned":
            self.pos_embed: nn.Embedding | None = nn.Embedding(max_len, d_model)
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        else:
            self.pos_embed = None
            self.register_buffer("pos_table", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=norm_first
        )
        encoder = nn.TransformerEncoder(  # no nested-tensor fast path: same numerics in training and inference
            layer, num_encoder_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.transformer = nn.Transformer(
            d_model,
            nhead,
            num_encoder_layers,
            num_decoder_layers,
            dim_feedforward,
            dropout,
            custom_encoder=encoder,
            batch_first=True,
            norm_first=norm_first,
        )
        self.out = nn.Linear(d_model, vocab_size)
        if tie_output:
            self.out.weight = self.embed.weight

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        if self.pos_embed is not None:
            if n > self.max_len:
                raise ValueError(f"sequence of {n} tokens is longer than the model's max_len={self.max_len}")
            pos = self.pos_embed.weight[:n]
        else:
            if n > self.pos_table.shape[0]:
                self.pos_table = sinusoidal_positions(n, self.d_model).to(self.pos_table)
            pos = self.pos_table[:n]
        return self.dropout(self.embed(tokens) * math.sqrt(self.d_model) + pos)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's memory ``(B, S, d)`` and the source padding mask ``(B, S)`` (True at padding)."""
        src_pad = src == self.pad_id
        memory = self.transformer.encoder(self._embed(src), src_key_padding_mask=src_pad)
        return memory, src_pad

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_pad: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` of the target prefix ``tgt_in`` given the encoder's memory."""
        t = tgt_in.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tgt_in.device), diagonal=1)
        hidden = self.transformer.decoder(
            self._embed(tgt_in),
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt_in == self.pad_id,
            memory_key_padding_mask=src_pad,
            tgt_is_causal=True,
        )
        return self.out(hidden)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)``: position t predicts token t+1 of the target from ``src`` and ``tgt_in[:, :t+1]``."""
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)


@register_model("seq2seq_transformer")
def seq2seq_transformer(
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 256,
    d_model: int = 64,
    nhead: int = 4,
    num_encoder_layers: int = 2,
    num_decoder_layers: int = 2,
    dim_feedforward: int = 128,
    dropout: float = 0.1,
    positions: str = "sinusoidal",
    norm_first: bool = False,
    tie_output: bool = False,
) -> Seq2SeqTransformer:
    """:class:`Seq2SeqTransformer` with the vocabulary as ``num_classes`` and the longest sequence as ``image_size``
    (a text DataModule links both; ``in_channels`` is unused)."""
    return Seq2SeqTransformer(
        num_classes,
        image_size,
        d_model,
        nhead,
        num_encoder_layers,
        num_decoder_layers,
        dim_feedforward,
        dropout,
        positions,
        norm_first,
        tie_output,
    )
