"""The word-level LSTM language model of PyTorch's word_language_model example (model.py).

An embedding, `nlayers` LSTM layers with dropout between them, dropout on the embeddings and on
the last layer's output, and a linear decoder to the vocabulary whose weight is the embedding's
(Press & Wolf 2017; Inan et al. 2017), which needs emsize == nhid. The example's initialisation:
embedding and decoder weights U(-0.1, 0.1), decoder bias zero, PyTorch's default for the LSTM.
The example's defaults are emsize = nhid = 200, 2 layers, dropout 0.2; Zaremba et al.'s medium
and large models are 650 / 0.5 and 1500 / 0.65.

Inputs are batch-first, (batch, bptt) token ids, and the hidden state carries from one window
of a token stream to the next (truncated backpropagation through time): start it with
`init_hidden`, cut its graph with `detach_hidden` after each step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Hidden = tuple[torch.Tensor, torch.Tensor]


class LSTMLanguageModel(nn.Module):
    """Embedding, LSTM and tied decoder over a vocabulary of `ntokens` words."""

    def __init__(
        self, ntokens: int, emsize: int, nhid: int, nlayers: int, dropout: float, tied: bool
    ) -> None:
        super().__init__()
        if tied and emsize != nhid:
            raise ValueError(f"tied weights need emsize == nhid, got emsize {emsize}, nhid {nhid}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.nlayers, self.nhid = nlayers, nhid
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntokens, emsize)
        # Between LSTM layers only: one layer has nowhere to put it (PyTorch warns).
        between = dropout if nlayers > 1 else 0.0
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=between, batch_first=True)
        self.decoder = nn.Linear(nhid, ntokens)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tied:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch_size: int) -> Hidden:
        """The zero state (h, c), each (nlayers, batch_size, nhid), on the model's device."""
        weight = self.decoder.weight
        shape = (self.nlayers, batch_size, self.nhid)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def forward(
        self, tokens: torch.Tensor, hidden: Hidden | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        """Logits (batch, bptt, ntokens) for the next word after each of `tokens` (batch, bptt),
        and the new hidden state. A missing `hidden` is the zero state."""
        if hidden is None:
            hidden = self.init_hidden(tokens.shape[0])
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(output)), hidden


def detach_hidden(hidden: Hidden) -> Hidden:
    """The same state cut from the graph of the steps before (truncated BPTT)."""
    return tuple(state.detach() for state in hidden)


def lstm(
    num_classes: int,
    input_shape: Sequence[int],
    *,
    emsize: int = 200,
    nhid: int = 200,
    nlayers: int = 2,
    dropout: float = 0.2,
    tied: bool = True,
) -> LSTMLanguageModel:
    """The LSTM language model over a vocabulary of `num_classes` words, for windows of token ids
    `input_shape` = (bptt,). Keyword options as the example's flags; ValueError for bad ones."""
    if len(input_shape) != 1:
        raise ValueError(
            f"lstm needs an input shape (bptt,) of token ids, got {tuple(input_shape)}"
        )
    if min(emsize, nhid, nlayers) < 1:
        raise ValueError(
            f"emsize, nhid and nlayers must be positive, got {emsize}, {nhid}, {nlayers}"
        )
    return LSTMLanguageModel(num_classes, emsize, nhid, nlayers, dropout, tied)
