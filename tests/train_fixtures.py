"""Shared by tests/test_train.py and tests/test_train_runs.py: a synthetic corpus, a tokenizer
and small base models, and the command-line settings of a short run (not a test module: pytest
does not collect it)."""

import json
import os

import pytest
import torch

import data
from data.batch import collate
from data.tokenizer import train_tokenizer
from losses import loss_fn
from model import BART, BARTConfig, config_from_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(project="demo", n_classes=12, per_class=3):
    """Small synthetic focal-method/test pairs, several per test class (folds keep classes
    whole)."""
    out = []
    for c in range(n_classes):
        for m in range(per_class):
            name = f"get{chr(65 + c)}{m}"
            src = f"Box{c} {{ public int {name}(int x) {{ return x + {c * m}; }} }}"
            out.append(
                {
                    "id": f"{project}_{c}_{m}",
                    "project": project,
                    "test_class": {"file": f"T{c}.java", "identifier": f"T{c}Test"},
                    "focal_class": {"file": f"Box{c}.java", "identifier": f"Box{c}"},
                    "src": src,
                    # every focal-context level
                    **{f"src_{level}": src for level in data.FOCAL_CONTEXTS},
                    "tgt": f"@Test public void test{name}() {{ assertEquals({c * m + 1}, new Box{c}().{name}(1)); }}",
                }
            )
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A corpus file, a tokenizer trained on it and a small random base model saved in HF layout."""
    d = tmp_path_factory.mktemp("train")
    recs = records()
    with open(d / "demo.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    tok = train_tokenizer(
        (r[k] for r in recs for k in ("src", "tgt")), vocab_size=300, min_frequency=1
    )
    tok.save(str(d / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = BARTConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
    )
    BART(cfg).save_pretrained(d / "base")
    return d, tok


def args(d, **over):
    kw = dict(
        project=d / "demo.jsonl",
        tokenizer=d / "tokenizer.json",
        base=d / "base",
        out_dir=d / "runs",
        batch_size=4,
        eval_interval=3,
        max_steps=12,
        warmup_steps=2,
        patience=50,
        prefix_len=4,
        # base mode: small and fast, no source trees needed
        preset="tiny",
        denoise_text="pairs",
    )
    kw.update(over)
    return [f"--{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def pretrained(workspace):
    """The tiny preset briefly trained on classes 0-11 of the synthetic corpus: a base to
    customize (a random base is no stand-in: its frozen layers give a prefix or LoRA too little
    to steer, e.g. a prefix stalls at 5x)."""
    _, tok = workspace
    torch.manual_seed(0)
    model = BART(config_from_preset("tiny", vocab_size=tok.get_vocab_size(), dropout=0.0))
    recs = records()
    src, tgt = ([e.ids for e in tok.encode_batch([r[k] for r in recs])] for k in ("src", "tgt"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(80):
        idx = torch.randint(0, len(recs), (8,)).tolist()
        loss_fn(
            model, collate([src[i] for i in idx], [tgt[i] for i in idx], "cpu"), NO_AUTOCAST
        ).backward()
        opt.step()
        opt.zero_grad()
    return model.config, {k: v.clone() for k, v in model.state_dict().items()}


NO_AUTOCAST = torch.autocast("cpu", enabled=False)
OVERFIT_LR = {"custom": 1e-3, "leo": 1e-2, "lldb": 3e-3, "prefix": 1e-1, "lora": 1e-2}
