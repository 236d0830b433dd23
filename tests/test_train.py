"""train.py, the loop: each strategy overfits one batch; targets are laid out as fairseq's
translation task; early stopping keeps the best checkpoint and the saved delta reproduces the
trained model; a customization that only hurts keeps the base. Runs, resume, bad input, torchrun:
tests/test_train_runs.py. Run: `make test` (or `make smoke` for overfit)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import runs
import strategies
import train
from data.batch import collate
from data.tokenizer import SPECIAL_IDS
from losses import loss_fn
from model import BART

# fixtures are requested by name
from train_fixtures import NO_AUTOCAST, OVERFIT_LR, args, pretrained, records, workspace  # noqa: F401


@pytest.mark.parametrize("name", list(strategies.STRATEGIES))
def test_overfit_one_batch(workspace, pretrained, name):
    """Every strategy drives the loss on one batch of an unseen class down by 10x (collate, loss,
    AdamW)."""
    _, tok = workspace
    model = BART(pretrained[0])
    model.load_state_dict(pretrained[1])
    batch_recs = records(n_classes=13)[-4:]  # class 12: not in the base's training data
    src, tgt = (
        [e.ids for e in tok.encode_batch([r[k] for r in batch_recs])] for k in ("src", "tgt")
    )
    options = train.strategy_options(
        train.parse_args([f"--strategy={name}", "--prefix_len=16"], train.settings)[0]
    )
    init = (
        {"init_ids": strategies.most_frequent_ids(src + tgt, 16, exclude=SPECIAL_IDS)}
        if name == "prefix"
        else {}
    )
    strategies.apply(model, name, **options, **init)
    opt = torch.optim.AdamW(strategies.trainable_parameters(model), lr=OVERFIT_LR[name])
    batch = collate(src, tgt, "cpu")
    model.train()
    losses = []
    for _ in range(300):
        loss = loss_fn(model, batch, NO_AUTOCAST)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, (
        f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
    )


def test_collate_targets_follow_fairseq_translation():
    """Decoder input is </s> t1..tn, labels t1..tn </s> (the <s> of the encoding dropped), pads
    ignored."""
    ids, mask, dec, labels = collate(
        [[0, 7, 2], [0, 5, 6, 9, 2]], [[0, 11, 12, 2], [0, 13, 2]], "cpu"
    )
    assert ids.tolist() == [[0, 7, 2, 1, 1], [0, 5, 6, 9, 2]] and mask.tolist() == [
        [1, 1, 1, 0, 0],
        [1] * 5,
    ]
    assert dec.tolist() == [[2, 11, 12], [2, 13, 1]]
    assert labels.tolist() == [[11, 12, 2], [13, 2, -100]]


def test_early_stopping_keeps_best_and_delta_reproduces_model(workspace):
    """best.safetensors holds only trainable tensors at the lowest logged val loss; applied to
    the base it reproduces the trained model's logits exactly; config.json round-trips through
    parse_args."""
    d, _ = workspace
    trained = train.main(
        args(d, name="es", strategy="custom", lr=1e-2, max_steps=12, dropout=0.0, warmup_steps=1)
    )
    run = d / "runs" / "es"
    log = [json.loads(x) for x in open(run / "log.jsonl")]
    assert log[0]["step"] == 0 and [x["step"] for x in log[1:]] == [3, 6, 9, 12], (
        "step 0 (the base) is evaluated too"
    )
    best = load_file(run / "best.safetensors")
    ref = BART.from_pretrained(d / "base")
    strategies.apply(ref, "custom")
    assert set(best) == set(runs.trainable_state_dict(ref)), (
        "the delta holds exactly the trainable tensors"
    )
    cfg = json.load(open(run / "config.json"))
    resumed, _ = train.parse_args([f"--{k}={cfg[k]}" for k in train.settings], train.settings)
    assert all(resumed[k] == cfg[k] for k in train.settings), "config.json must round-trip"
    m = BART.from_pretrained(d / "base")
    strategies.apply(m, "custom")
    runs.load_trainable(m, run / "best.safetensors")
    x = torch.tensor([[0, 5, 6, 2]]), torch.ones(1, 4, dtype=torch.long), torch.tensor([[2, 7, 8]])
    ck = torch.load(run / "last.pt", weights_only=True)
    assert min(line["val_loss"] for line in log) == ck["state"]["best_val"] < log[0]["val_loss"]
    for k, v in ck["trainable"].items():  # training ended by restoring the best tensors
        assert torch.equal(v, best[k])
    base_fc1 = BART.from_pretrained(d / "base").state_dict()["model.decoder.layers.1.fc1.weight"]
    assert not torch.equal(best["model.decoder.layers.1.fc1.weight"], base_fc1), (
        "the delta must have trained"
    )
    trained.eval()
    # the same attention kernel, so equality can be exact
    m.config.attn_impl = trained.config.attn_impl
    assert torch.equal(m(*x), trained(*x)), (
        "base + delta must reproduce the trained model bit for bit"
    )


def test_a_customization_that_only_hurts_keeps_the_base(workspace, pretrained, tmp_path, capsys):
    """Step 0 is a candidate: with a learning rate that can only hurt a base trained on this
    corpus, no step beats it, early stopping ends the run after `patience` evaluations, and the
    kept delta is the base's own tensors."""
    d, _ = workspace
    model = BART(pretrained[0])
    model.load_state_dict(pretrained[1])
    model.save_pretrained(tmp_path / "good")
    train.main(
        args(
            d,
            name="hurt",
            strategy="lldb",
            base=tmp_path / "good",
            lr=3.0,
            max_steps=30,
            patience=2,
            warmup_steps=1,
            out_dir=tmp_path / "runs",
        )
    )
    assert (
        "best val loss" in (out := capsys.readouterr().out)
        and "the base itself: no step beat it" in out
    )
    log = [json.loads(x) for x in open(tmp_path / "runs" / "hurt" / "log.jsonl")]
    assert [x["step"] for x in log] == [0, 3, 6] and all(
        x["val_loss"] > log[0]["val_loss"] for x in log[1:]
    )
    best, base = load_file(tmp_path / "runs" / "hurt" / "best.safetensors"), model.state_dict()
    assert best and all(torch.equal(v, base[k]) for k, v in best.items())
