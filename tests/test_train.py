"""train.py: each strategy overfits one batch; early stopping keeps the best checkpoint; kill -9 + resume equals an
uninterrupted run bit for bit (CPU); the saved delta reproduces the trained model; the config round-trips; bad
input fails clearly; torchrun data parallel runs on CPU (gloo). Run: `make test` (or `make smoke` for overfit)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
import runs
import strategies
import train
from data.tokenizer import encode_pairs, load_tokenizer, train_tokenizer
from model import BART, BARTConfig, config_from_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(project="demo", n_classes=12, per_class=3):
    """Small synthetic focal-method/test pairs, several per test class (folds keep classes whole)."""
    out = []
    for c in range(n_classes):
        for m in range(per_class):
            name = f"get{chr(65 + c)}{m}"
            src = f"Box{c} {{ public int {name}(int x) {{ return x + {c * m}; }} }}"
            out.append({"id": f"{project}_{c}_{m}", "project": project, "test_class": {"file": f"T{c}.java", "identifier": f"T{c}Test"},
                        "focal_class": {"file": f"Box{c}.java", "identifier": f"Box{c}"}, "src": src,
                        **{f"src_{level}": src for level in data.FOCAL_CONTEXTS},  # every focal-context level
                        "tgt": f"@Test public void test{name}() {{ assertEquals({c * m + 1}, new Box{c}().{name}(1)); }}"})
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A corpus file, a tokenizer trained on it and a small random base model saved in HF layout."""
    d = tmp_path_factory.mktemp("train")
    recs = records()
    with open(d / "demo.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    tok = train_tokenizer((r[k] for r in recs for k in ("src", "tgt")), vocab_size=300, min_frequency=1)
    tok.save(str(d / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = BARTConfig(vocab_size=tok.get_vocab_size(), d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_position_embeddings=128)
    BART(cfg).save_pretrained(d / "base")
    return d, tok


def args(d, **over):
    kw = dict(project=d / "demo.jsonl", tokenizer=d / "tokenizer.json", base=d / "base", out_dir=d / "runs",
              batch_size=4, eval_interval=3, max_steps=12, warmup_steps=2, patience=50, prefix_len=4)
    kw.update(over)
    return [f"--{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def pretrained(workspace):
    """The tiny preset briefly trained on classes 0-11 of the synthetic corpus: a base to customize (a random base
    is no stand-in: its frozen layers give a prefix or LoRA too little to steer, e.g. a prefix stalls at 5x)."""
    _, tok = workspace
    torch.manual_seed(0)
    model = BART(config_from_preset("tiny", vocab_size=tok.get_vocab_size(), dropout=0.0))
    recs = records()
    src, tgt = ([e.ids for e in tok.encode_batch([r[k] for r in recs])] for k in ("src", "tgt"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(80):
        idx = torch.randint(0, len(recs), (8,)).tolist()
        train.loss_fn(model, train.collate([src[i] for i in idx], [tgt[i] for i in idx], "cpu"), NO_AUTOCAST).backward()
        opt.step()
        opt.zero_grad()
    return model.config, {k: v.clone() for k, v in model.state_dict().items()}


NO_AUTOCAST = torch.autocast("cpu", enabled=False)
OVERFIT_LR = {"custom": 1e-3, "leo": 1e-2, "lldb": 3e-3, "prefix": 1e-1, "lora": 1e-2}


@pytest.mark.parametrize("name", list(strategies.STRATEGIES))
def test_overfit_one_batch(workspace, pretrained, name):
    """Every strategy drives the loss on one batch of an unseen class down by 10x (collate, loss, AdamW)."""
    _, tok = workspace
    model = BART(pretrained[0])
    model.load_state_dict(pretrained[1])
    batch_recs = records(n_classes=13)[-4:]  # class 12: not in the base's training data
    src, tgt = ([e.ids for e in tok.encode_batch([r[k] for r in batch_recs])] for k in ("src", "tgt"))
    options = train.strategy_options(train.parse_args([f"--strategy={name}", "--prefix_len=16"], train.settings)[0])
    init = {"init_ids": strategies.most_frequent_ids(src + tgt, 16, exclude=range(4))} if name == "prefix" else {}
    strategies.apply(model, name, **options, **init)
    opt = torch.optim.AdamW(strategies.trainable_parameters(model), lr=OVERFIT_LR[name])
    batch = train.collate(src, tgt, "cpu")
    model.train()
    losses = []
    for _ in range(300):
        loss = train.loss_fn(model, batch, NO_AUTOCAST)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"


def test_collate_targets_follow_fairseq_translation():
    """Decoder input is </s> t1..tn, labels t1..tn </s> (the <s> of the encoding dropped), pads ignored."""
    ids, mask, dec, labels = train.collate([[0, 7, 2], [0, 5, 6, 9, 2]], [[0, 11, 12, 2], [0, 13, 2]], "cpu")
    assert ids.tolist() == [[0, 7, 2, 1, 1], [0, 5, 6, 9, 2]] and mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert dec.tolist() == [[2, 11, 12], [2, 13, 1]]
    assert labels.tolist() == [[11, 12, 2], [13, 2, -100]]


def test_early_stopping_keeps_best_and_delta_reproduces_model(workspace):
    """best.safetensors holds only trainable tensors at the lowest logged val loss; applied to the base it
    reproduces the trained model's logits exactly; config.json round-trips through parse_args."""
    d, _ = workspace
    trained = train.main(args(d, name="es", strategy="custom", lr=1e-2, max_steps=12, dropout=0.0, warmup_steps=1))
    run = d / "runs" / "es"
    log = [json.loads(x) for x in open(run / "log.jsonl")]
    assert log[0]["step"] == 0 and [x["step"] for x in log[1:]] == [3, 6, 9, 12], "step 0 (the base) is evaluated too"
    best = load_file(run / "best.safetensors")
    ref = BART.from_pretrained(d / "base")
    strategies.apply(ref, "custom")
    assert set(best) == set(strategies.trainable_state_dict(ref)), "the delta holds exactly the trainable tensors"
    cfg = json.load(open(run / "config.json"))
    resumed, _ = train.parse_args([f"--{k}={cfg[k]}" for k in train.settings], train.settings)
    assert all(resumed[k] == cfg[k] for k in train.settings), "config.json must round-trip"
    m = BART.from_pretrained(d / "base")
    strategies.apply(m, "custom")
    strategies.load_trainable(m, run / "best.safetensors")
    x = torch.tensor([[0, 5, 6, 2]]), torch.ones(1, 4, dtype=torch.long), torch.tensor([[2, 7, 8]])
    ck = torch.load(run / "last.pt", weights_only=True)
    assert min(line["val_loss"] for line in log) == ck["state"]["best_val"] < log[0]["val_loss"]
    for k, v in ck["trainable"].items():  # training ended by restoring the best tensors
        assert torch.equal(v, best[k])
    base_fc1 = BART.from_pretrained(d / "base").state_dict()["model.decoder.layers.1.fc1.weight"]
    assert not torch.equal(best["model.decoder.layers.1.fc1.weight"], base_fc1), "the delta must have trained"
    trained.eval()
    m.config.attn_impl = trained.config.attn_impl  # the same attention kernel, so equality can be exact
    assert torch.equal(m(*x), trained(*x)), "base + delta must reproduce the trained model bit for bit"


def test_a_customization_that_only_hurts_keeps_the_base(workspace, pretrained, tmp_path, capsys):
    """Step 0 is a candidate: with a learning rate that can only hurt a base trained on this corpus, no step beats
    it, early stopping ends the run after `patience` evaluations, and the kept delta is the base's own tensors."""
    d, _ = workspace
    model = BART(pretrained[0])
    model.load_state_dict(pretrained[1])
    model.save_pretrained(tmp_path / "good")
    train.main(args(d, name="hurt", strategy="lldb", base=tmp_path / "good", lr=3.0, max_steps=30, patience=2,
                    warmup_steps=1, out_dir=tmp_path / "runs"))
    assert "best val loss" in (out := capsys.readouterr().out) and "the base itself: no step beat it" in out
    log = [json.loads(x) for x in open(tmp_path / "runs" / "hurt" / "log.jsonl")]
    assert [x["step"] for x in log] == [0, 3, 6] and all(x["val_loss"] > log[0]["val_loss"] for x in log[1:])
    best, base = load_file(tmp_path / "runs" / "hurt" / "best.safetensors"), model.state_dict()
    assert best and all(torch.equal(v, base[k]) for k, v in best.items())


def run_cli(d, name, extra=(), wait_for_evals=None):
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + args(d, name=name, strategy="custom", max_steps=18) + list(extra)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait_for_evals:  # kill -9 once that many evaluations are logged (mid-run, no chance to clean up)
        log = d / "runs" / name / "log.jsonl"
        while p.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= wait_for_evals):
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
    out = p.communicate()[0]
    return p.returncode, out


def test_kill_and_resume_equals_uninterrupted(workspace):
    """A run killed with SIGKILL and resumed ends with bit-identical validation losses and weights."""
    d, _ = workspace
    rc, out = run_cli(d, "straight")
    assert rc == 0, out
    rc, _ = run_cli(d, "killed", wait_for_evals=2)
    assert rc == -signal.SIGKILL
    rc, out = run_cli(d, "killed")
    assert rc == 0 and "resumed" in out, out
    a = [json.loads(x) for x in open(d / "runs" / "straight" / "log.jsonl")]
    b = [json.loads(x) for x in open(d / "runs" / "killed" / "log.jsonl")]
    assert [x["val_loss"] for x in a] == [x["val_loss"] for x in b] and [x["step"] for x in a] == [x["step"] for x in b]
    wa, wb = load_file(d / "runs" / "straight" / "best.safetensors"), load_file(d / "runs" / "killed" / "best.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_input_fails_clearly(workspace, tmp_path):
    """Unknown key, wrong type, unknown project, too few classes, vocabulary mismatch, resuming a run with another
    strategy, unwritable folder."""
    d, _ = workspace
    for argv, msg in [(["--nope=1"], "unknown setting 'nope'"), (["--batch_size=x"], "not a valid int"),
                      (["--strategy=magic"], "unknown strategy 'magic'")]:
        with pytest.raises(SystemExit, match=msg):
            train.main(argv)
    with pytest.raises(KeyError, match="unknown project 'no-such-project'"):
        train.main(args(d, name="u", project="no-such-project"))
    with open(tmp_path / "tiny.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records(n_classes=3))
    with pytest.raises(ValueError, match="too few records"):
        train.main(args(d, name="few", project=tmp_path / "tiny.jsonl"))
    other = train_tokenizer(["a b c"], vocab_size=280, min_frequency=1)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="tokenizer has"):
        train.main(args(d, name="v", tokenizer=tmp_path / "other.json"))
    train.main(args(d, name="other", strategy="custom", max_steps=3, eval_interval=3, out_dir=tmp_path / "runs"))
    with pytest.raises(SystemExit, match=r"other settings \(strategy: 'custom' -> 'lldb'; lr: "):  # resume, other strategy
        train.main(args(d, name="other", strategy="lldb", max_steps=6, eval_interval=3, out_dir=tmp_path / "runs"))
    (tmp_path / "afile").write_text("")  # a folder under a regular file cannot be made, not even by root
    with pytest.raises(SystemExit, match="cannot write the run folder"):
        train.main(args(d, name="x", out_dir=tmp_path / "afile" / "runs"))


def test_torchrun_data_parallel_on_cpu(workspace):
    """torchrun with 2 gloo processes trains a base model and saves it (the multi-GPU path, smoke-tested)."""
    d, _ = workspace
    with open(d / "big.jsonl", "w") as f:  # base mode validates on one 20th of the test classes: needs > 20
        f.writelines(json.dumps(r) + "\n" for r in records(n_classes=25, per_class=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "train.py")] + args(d, name="ddp", mode="base", base_projects=d / "big.jsonl",
                                                  save_base=d / "ddp_base", max_steps=4, eval_interval=2,
                                                  denoise_steps=0)  # the supervised stage only: its batches are recomputed below
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert BART.from_pretrained(d / "ddp_base").config.vocab_size == BART.from_pretrained(d / "base").config.vocab_size
    # tokens: the sum of what both ranks ran (each half of every global batch), recomputed here from the data plan
    cfg, _ = train.parse_args(args(d, mode="base", denoise_steps=0), train.settings)
    train_r, _ = data.holdout(data.load_project(d / "big.jsonl"))
    src, tgt, _ = encode_pairs(load_tokenizer(d / "tokenizer.json"), train_r, cfg["max_src_len"], cfg["max_tgt_len"],
                               src_key=f"src_{cfg['focal_context']}")
    lengths, want, epoch, b = [len(s) + len(t) for s, t in zip(src, tgt)], 0, 0, 0
    for step in range(4):
        plan = train.batches(lengths, 2 * cfg["batch_size"], cfg["seed"], epoch)
        want += sum(len(tgt[i]) - 1 for i in plan[b])
        b = b + 1 if b + 1 < len(plan) else 0
        epoch += b == 0
    log = [json.loads(x) for x in open(d / "runs" / "ddp" / "log.jsonl")]
    assert log[-1]["step"] == 4 and log[-1]["tokens"] == want
    rng = torch.load(d / "runs" / "ddp" / "last.pt", weights_only=True)["rng"]  # each rank's own generator state
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])
    with pytest.raises(SystemExit, match=r"saved by 2 processes, this run has 1"):  # a rank's state cannot be dropped
        train.main(args(d, name="ddp", mode="base", base_projects=d / "big.jsonl", save_base=d / "ddp_base", max_steps=4,
                        eval_interval=2, denoise_steps=0))


def test_attention_dropout_with_the_triton_kernel_is_a_printed_choice(workspace, tmp_path, capsys):
    """A checkpoint with attention_dropout = 0.1 customized with attn_impl=triton: the run's setting (0.0, which the
    kernel supports) replaces the checkpoint's, and says so; asking for both is refused before anything runs."""
    d, tok = workspace
    cfg = BART.from_pretrained(d / "base").config
    cfg.attention_dropout = 0.1
    BART(cfg).save_pretrained(tmp_path / "dropout_base")
    kw = dict(name="t", base=tmp_path / "dropout_base", out_dir=tmp_path / "runs", attn_impl="triton", strategy="lldb",
              max_steps=1, eval_interval=1)
    with pytest.raises(SystemExit, match=r"attn_impl=triton has no attention dropout but attention_dropout=0.1"):
        train.main(args(d, **kw, attention_dropout=0.1))
    model = train.main(args(d, **kw))
    assert "attention_dropout: the checkpoint's 0.1 replaced by this run's 0.0" in capsys.readouterr().out
    assert model.config.attention_dropout == 0.0 and model.config.attn_impl == "triton"


def test_resume_with_another_setting_is_refused_and_a_cut_log_line_survived(workspace, tmp_path, capsys):
    """A rerun resumes only with the settings that made the run (another fold would train on its test fold), and a
    log line cut short by a kill is dropped with a message; a corrupt line elsewhere is an error naming the line."""
    d, _ = workspace
    kw = dict(name="r", strategy="lldb", max_steps=3, eval_interval=3, out_dir=tmp_path / "runs")
    train.main(args(d, **kw))
    with pytest.raises(SystemExit, match=r"other settings \(fold: 0 -> 1\).*another --name, or delete"):
        train.main(args(d, **kw, fold=1))
    log = tmp_path / "runs" / "r" / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines) + "\n" + lines[-1][:25])  # a kill in the middle of writing a line
    train.main(args(d, **{**kw, "max_steps": 6}))  # max_steps may change: the run goes on
    assert "dropping a partial last line" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [0, 3, 6]
    log.write_text("{broken\n" + log.read_text())
    with pytest.raises(SystemExit, match=r"log.jsonl:1: corrupt log line"):
        train.main(args(d, **{**kw, "max_steps": 9}))


def test_base_two_stages_and_training_json(workspace, tmp_path, capsys):
    """make base's shape: denoising steps, then supervised ones, each logged with its stage and source_gain; the
    saved base carries training.json; a customization inherits it and refuses a conflicting setting by name."""
    d, _ = workspace
    with open(tmp_path / "big.jsonl", "w") as f:  # base mode holds out 5% of the test classes: needs > 20
        f.writelines(json.dumps(r) + "\n" for r in records(n_classes=25, per_class=2))
    train.main(args(d, name="b", mode="base", base_projects=tmp_path / "big.jsonl", save_base=tmp_path / "base",
                    out_dir=tmp_path / "runs", denoise_steps=3, max_steps=6, focal_context="fm", max_src_len=40,
                    max_tgt_len=48))
    log = [json.loads(x) for x in open(tmp_path / "runs" / "b" / "log.jsonl")]
    assert [(x["step"], x["stage"]) for x in log] == [(3, "denoise"), (6, "supervised")]
    assert all(x["source_gain"] > 0 and "val_loss_empty_source" in x and "encoder_spread" in x for x in log)
    trained = json.load(open(tmp_path / "base" / "training.json"))
    assert {k: trained[k] for k in runs.CARRIED} == dict(tokenizer=os.path.relpath(d / "tokenizer.json", ROOT),
                                                          focal_context="fm", max_src_len=40, max_tgt_len=48)
    kw = dict(name="c", base=tmp_path / "base", out_dir=tmp_path / "runs", max_steps=3, eval_interval=3)
    with pytest.raises(SystemExit, match=r"--focal_context=fm_fc differs from the base's focal_context=fm"):
        train.main(args(d, **kw, focal_context="fm_fc"))
    train.main(args(d, **kw))
    saved = json.load(open(tmp_path / "runs" / "c" / "config.json"))
    assert (saved["focal_context"], saved["max_src_len"], saved["max_tgt_len"]) == ("fm", 40, 48)
