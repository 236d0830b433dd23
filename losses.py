"""The training loss and the teacher-forced measures that train.py's validation and evaluate.py's
scoring share (paper §3.2: perplexity; docs/source-gain.md: source_gain). Targets follow
data/batch.py's convention: the labels are t1..tn </s>, the decoder reads [start] + y[:-1].

    loss = loss_fn(model, collate(src, tgt, device), autocast)    # train.py, one micro-batch
    nll = target_nll(model, src, labels)             # [(summed NLL, tokens)] per example
    own, other, empty = source_nll(model, src, labels, other_src)
"""

import torch
import torch.nn.functional as F

from data.batch import IGNORE, decoder_inputs, pad, sorted_batches
from data.tokenizer import BOS, EOS


def loss_fn(model, batch, autocast):
    """Mean cross-entropy per target token of a batch from data.batch.collate. The output layer
    runs on the real target positions only (pads would cost V = 8192 columns each and be thrown
    away)."""
    ids, mask, dec, labels = batch
    real = labels != IGNORE
    with autocast:
        # (N real positions, V)
        logits = model(ids, mask, dec, logits_at=real)
    return F.cross_entropy(logits.float(), labels[real])


@torch.no_grad()
def target_nll(model, src, tgt, batch_size=16, device="cpu"):
    """[(summed NLL, tokens)] per example, teacher-forced: tgt[i] holds the labels y (t1..tn
    </s>), the decoder reads [start] + y[:-1]. The output layer runs on the real target
    positions only (logits_at), not on the pads."""
    out = {}
    start = model.config.decoder_start_token_id
    for idx, ids, mask in sorted_batches(src, batch_size, device):
        # (B, T) labels, (B, T) 1 = real token
        y, ymask = pad([tgt[i] for i in idx])
        dec = decoder_inputs(y, start)
        real = ymask.bool()
        # (N real positions, V)
        logits = model(ids, mask, dec.to(device), logits_at=real.to(device)).float()
        nll = torch.zeros(y.shape)
        nll[real] = F.cross_entropy(logits, y[real].to(device), reduction="none").cpu()
        sums = nll.sum(1).tolist()
        counts = ymask.sum(1).tolist()
        out.update(zip(idx, zip(sums, counts)))
    return [out[i] for i in range(len(src))]


def source_nll(model, src, tgt, other_src, batch_size=16, device="cpu"):
    """target_nll with each example's own source, with other_src[i] (the source of an example of
    another focal class: data.other_class_partners) and with the empty source <s></s>: the three
    sides of source_gain."""
    empty = [[BOS, EOS]] * len(src)
    return [target_nll(model, s, tgt, batch_size, device) for s in (src, other_src, empty)]
