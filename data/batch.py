"""Batching shared by train.py, evaluate.py and serve.py: id lists cut into batches and padded
into tensors, and the one statement of how a target is laid out for the decoder.

The target convention (fairseq's translation task, with which AthenaTest was trained): a target is
encoded `<s> t1..tn </s>` (data.tokenizer.encode_pairs; a target cut at the maximum length has no
`</s>`, `<s> t1..tn`); the labels drop the `<s>`, `t1..tn </s>`
(`labels`); the decoder reads the start token and then the labels but the last, `</s> t1..tn`
(`decoder_inputs`: `[start] + y[:-1]`, where `start` is `</s>`, BART's decoder start token).

    from data.batch import pad
    ids, mask = pad([[0, 5, 2], [0, 2]])   # (B, T) ids right-padded with <pad>, (B, T) 1 = real
"""

import torch

from data.tokenizer import EOS, PAD

# the label of a padded position: cross_entropy's ignore_index
IGNORE = -100


def pad(seqs, value=PAD):
    """A list of id lists -> (B, T) ids right-padded with `value`, and the (B, T) mask of real
    tokens (1) and pads (0)."""
    longest = max(len(s) for s in seqs)
    ids = [s + [value] * (longest - len(s)) for s in seqs]
    mask = [[1] * len(s) + [0] * (longest - len(s)) for s in seqs]
    return torch.tensor(ids), torch.tensor(mask)


def labels(target):
    """A target as encoded, <s> t1..tn </s> -> what the decoder predicts, t1..tn </s>."""
    return target[1:]


def decoder_inputs(y, start):
    """(B, T) labels -> (B, T) what the decoder reads: `start`, then each row's labels but the
    last (teacher forcing)."""
    first = torch.full_like(y[:, :1], start)
    return torch.cat([first, y[:, :-1]], 1)


def collate(src, tgt, device):
    """A training batch from (source, target) id lists as encoded: (ids, mask, decoder inputs,
    labels), each (B, ·) on `device`. The decoder reads </s> t1..tn and predicts t1..tn </s>;
    padded positions read <pad> and have the label IGNORE."""
    ids, _ = pad(src)
    y, real = pad([labels(t) for t in tgt])
    dec = decoder_inputs(y, EOS).masked_fill(real == 0, PAD)
    y = y.masked_fill(real == 0, IGNORE)
    mask = (ids != PAD).long()
    return ids.to(device), mask.to(device), dec.to(device), y.to(device)


def sorted_batches(src, size, device):
    """Yields (indices, ids (B, S), mask (B, S)) on `device`: the sources in batches of `size`,
    shortest first, so that sources of similar length share a batch (little padding)."""
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    for j in range(0, len(order), size):
        idx = order[j : j + size]
        ids, mask = pad([src[i] for i in idx])
        yield idx, ids.to(device), mask.to(device)


def bucketed_batches(lengths, batch_size, seed, epoch, bucket=64):
    """This epoch's batches of example indices, for training. A permutation seeded by (seed,
    epoch) is cut into chunks of `bucket` batches; each chunk is sorted by length and cut into
    batches, and the batches are shuffled: batches of similar lengths (little padding) in a
    random order. The same on every machine, so a resumed run sees exactly the batches it would
    have seen. lengths[i]: the cost of example i (source + target tokens)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    # whole batches only
    n = len(lengths) - len(lengths) % batch_size
    chunk = bucket * batch_size
    chunks = [sorted(perm[i : i + chunk], key=lambda j: lengths[j]) for i in range(0, n, chunk)]
    out = []
    for c in chunks:
        for i in range(0, len(c) - batch_size + 1, batch_size):
            out.append(c[i : i + batch_size])
    shuffled = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
    # fewer examples than one batch: the one batch of them all
    return shuffled or [perm]
