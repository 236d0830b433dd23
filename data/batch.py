"""Batching shared by train.py, evaluate.py and serve.py: id lists padded into tensors.

from data.batch import pad
ids, mask = pad([[0, 5, 2], [0, 2]])   # (B, T) ids right-padded with <pad>, (B, T) 1 = real
"""

import torch

from data.tokenizer import PAD


def pad(seqs, value=PAD):
    """A list of id lists -> (B, T) ids right-padded with `value`, and the (B, T) mask of real
    tokens (1) and pads (0)."""
    longest = max(len(s) for s in seqs)
    ids = [s + [value] * (longest - len(s)) for s in seqs]
    mask = [[1] * len(s) + [0] * (longest - len(s)) for s in seqs]
    return torch.tensor(ids), torch.tensor(mask)
