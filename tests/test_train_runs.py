"""train.py, the run around the loop: kill -9 + resume equals an uninterrupted run bit for bit
(CPU); a resume with another setting is refused and a log line cut by a kill is survived; bad
input fails clearly; torchrun data parallel on CPU (gloo) sums what each rank ran; attention
dropout with the Triton kernel is a printed choice; the base's two stages (and a denoising mix),
word dropout on its pair steps only, and the training.json it carries. Run: `make test`."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import runs
import strategies
import train
from data.batch import bucketed_batches
from data.tokenizer import encode_pairs, load_tokenizer, train_tokenizer
from model import BART
from train_fixtures import ROOT, args, records, workspace  # noqa: F401 (fixtures)


def run_cli(d, name, extra=(), wait_for_evals=None):
    cmd = (
        [sys.executable, os.path.join(ROOT, "train.py")]
        + args(d, name=name, strategy="custom", max_steps=18)
        + list(extra)
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # kill -9 once that many evaluations are logged (mid-run, no chance to clean up)
    if wait_for_evals:
        log = d / "runs" / name / "log.jsonl"
        while p.poll() is None and not (
            log.exists() and len(log.read_text().splitlines()) >= wait_for_evals
        ):
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
    out = p.communicate()[0]
    return p.returncode, out


def test_kill_and_resume_equals_uninterrupted(workspace):
    """A run killed with SIGKILL and resumed ends with bit-identical validation losses and
    weights."""
    d, _ = workspace
    rc, out = run_cli(d, "straight")
    assert rc == 0, out
    rc, _ = run_cli(d, "killed", wait_for_evals=2)
    assert rc == -signal.SIGKILL
    rc, out = run_cli(d, "killed")
    assert rc == 0 and "resumed" in out, out
    a = [json.loads(x) for x in open(d / "runs" / "straight" / "log.jsonl")]
    b = [json.loads(x) for x in open(d / "runs" / "killed" / "log.jsonl")]
    assert [x["val_loss"] for x in a] == [x["val_loss"] for x in b] and [x["step"] for x in a] == [
        x["step"] for x in b
    ]
    wa, wb = (
        load_file(d / "runs" / "straight" / "best.safetensors"),
        load_file(d / "runs" / "killed" / "best.safetensors"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_input_fails_clearly(workspace, tmp_path):
    """Unknown key, wrong type, unknown project, too few classes, vocabulary mismatch, resuming a
    run with another strategy, unwritable folder."""
    d, _ = workspace
    for argv, msg in [
        (["--nope=1"], "unknown setting 'nope'"),
        (["--batch_size=x"], "not a valid int"),
        (["--strategy=magic"], "unknown strategy 'magic'"),
    ]:
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
    train.main(
        args(
            d,
            name="other",
            strategy="custom",
            max_steps=3,
            eval_interval=3,
            out_dir=tmp_path / "runs",
        )
    )
    # resume, other strategy
    with pytest.raises(SystemExit, match=r"other settings \(strategy: 'custom' -> 'lldb'; lr: "):
        train.main(
            args(
                d,
                name="other",
                strategy="lldb",
                max_steps=6,
                eval_interval=3,
                out_dir=tmp_path / "runs",
            )
        )
    # a folder under a regular file cannot be made, not even by root
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="cannot write the run folder"):
        train.main(args(d, name="x", out_dir=tmp_path / "afile" / "runs"))


@pytest.mark.parametrize(
    "setting, value",
    [
        ("grad_clip", "-1"),
        ("grad_clip", "0"),
        ("min_lr_ratio", "-5"),
        ("max_src_len", "-1"),
        ("max_tgt_len", "2"),
        ("max_steps", "-5"),
        ("patience", "0"),
        ("eval_interval", "0"),
        ("grad_accum", "0"),
        ("batch_size", "0"),
        ("prefix_len", "0"),
        ("mask_ratio", "2"),
        ("dropout", "1"),
        ("lr", "-1e-3"),
        ("k_folds", "1"),
        ("fold", "4"),
        ("warmup_steps", "0"),
        ("beta2", "1"),
        ("device", "nope"),
    ],
)
def test_out_of_range_settings_are_refused_before_any_work(workspace, tmp_path, setting, value):
    """A setting outside its range (train.BOUNDS) is one line naming it and its rule, before the
    data is read: no run folder is made."""
    d, _ = workspace
    with pytest.raises(SystemExit, match=rf"^--{setting}=\S+: must be "):
        train.main(args(d, name="bad", out_dir=tmp_path / "runs", **{setting: value}))
    assert not (tmp_path / "runs").exists()


def test_a_run_is_bound_to_its_corpus(workspace, tmp_path):
    """The corpus rewritten at the same path (one test changed): resuming the run and scoring it
    are refused by name, since its folds may now put training examples in the test fold."""
    import evaluate

    d, _ = workspace
    corpus = tmp_path / "demo.jsonl"
    lines = (d / "demo.jsonl").read_text().splitlines()
    corpus.write_text("\n".join(lines) + "\n")
    kw = dict(
        name="bound",
        project=corpus,
        out_dir=tmp_path / "runs",
        strategy="lldb",
        max_steps=3,
        eval_interval=3,
    )
    train.main(args(d, **kw))
    record = json.loads(lines[0])
    record["tgt"] = record["tgt"].replace("assertEquals", "assertSame")
    corpus.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(SystemExit, match=r"other settings \(corpus_checksum: "):
        train.main(args(d, **{**kw, "max_steps": 6}))
    with pytest.raises(SystemExit, match=r"demo.jsonl has changed since .*bound was trained on it"):
        evaluate.score_run(tmp_path / "runs" / "bound", limit=2, beams=2, max_new_tokens=4)


def test_a_foreign_bases_lengths_fit_its_position_table(workspace, tmp_path, capsys):
    """A base without training.json (the fixture's: 128 positions): the default lengths of 1024
    are cut to 128 and said; a length given beyond 128 is refused by name."""
    d, _ = workspace
    kw = dict(name="fit", out_dir=tmp_path / "runs", strategy="lldb", max_steps=1, eval_interval=1)
    with pytest.raises(
        SystemExit, match=r"--max_src_len=2000 is longer than the base's position table \(128"
    ):
        train.main(args(d, **kw, max_src_len=2000))
    train.main(args(d, **kw))
    assert "max_src_len: 1024 cut to 128" in capsys.readouterr().out
    saved = json.load(open(tmp_path / "runs" / "fit" / "config.json"))
    assert (saved["max_src_len"], saved["max_tgt_len"]) == (128, 128)


def test_bad_records_are_named_by_line(workspace, tmp_path):
    """A record whose tgt is not text, one without an id, one without the base's focal context:
    errors naming the file and line (or the record) and what to do, not a KeyError's bare key."""
    d, _ = workspace
    good = [json.loads(x) for x in (d / "demo.jsonl").read_text().splitlines()]
    cases = [
        ({**good[1], "tgt": 7}, r"bad.jsonl:2: a record with tgt not text: mine the corpus again"),
        (
            {k: v for k, v in good[1].items() if k != "id"},
            r"bad.jsonl:2: a record with no id: mine",
        ),
    ]
    for record, msg in cases:
        (tmp_path / "bad.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [good[0], record, *good[2:]])
        )
        with pytest.raises(ValueError, match=msg):
            train.main(
                args(d, name="bad", project=tmp_path / "bad.jsonl", out_dir=tmp_path / "runs")
            )
    lacking = [{k: v for k, v in r.items() if k != "src_fm_fc_ms_ff"} for r in good]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lacking))
    with pytest.raises(
        SystemExit, match=r"has no 'src_fm_fc_ms_ff', the focal context the base reads"
    ):
        train.main(args(d, name="bad", project=tmp_path / "bad.jsonl", out_dir=tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_save_base_under_a_file_is_refused_before_training(workspace, tmp_path):
    d, _ = workspace
    (tmp_path / "afile").write_text("x")
    for target, msg in (
        (tmp_path / "afile" / "base", r"afile is a file, not a folder"),
        (tmp_path / "afile", r"is a file; a base is saved as a folder"),
    ):
        with pytest.raises(SystemExit, match=rf"^--save_base=.*: .*{msg}"):
            train.main(
                args(
                    d,
                    name="b",
                    mode="base",
                    out_dir=tmp_path / "runs",
                    save_base=target,
                    denoise_steps=0,
                )
            )
    assert not (tmp_path / "runs").exists()


def test_one_writer_per_run_folder(workspace, tmp_path):
    """While another process holds a run folder (train.py or evaluate.py on it), a second
    train.py on it stops with one line naming the holder's pid; once the holder is gone (killed:
    no clean-up), the run goes ahead."""
    d, _ = workspace
    run = tmp_path / "runs" / "locked"
    run.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import runs, sys, time; runs.lock_run(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)",
            str(run),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    kw = dict(
        name="locked", out_dir=tmp_path / "runs", strategy="lldb", max_steps=2, eval_interval=2
    )
    with pytest.raises(SystemExit, match=rf"runs/locked is in use by process {holder.pid} "):
        train.main(args(d, **kw))
    assert not (run / "log.jsonl").exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # what a kill inside a save leaves
    (run / ".tmp-abc123-last.pt").write_bytes(b"half a checkpoint")
    train.main(args(d, **kw))
    assert not (run / ".tmp-abc123-last.pt").exists()

    def strict(line):
        return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl: not JSON"))

    log = [strict(x) for x in (run / "log.jsonl").read_text().splitlines()]
    # step 0: no training loss yet
    assert [x["step"] for x in log] == [0, 2] and log[0]["train_loss"] is None
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it


def test_torchrun_data_parallel_on_cpu(workspace):
    """torchrun with 2 gloo processes trains a base model and saves it (the multi-GPU path,
    smoke-tested)."""
    d, _ = workspace
    # base mode validates on one 20th of the test classes: needs > 20
    with open(d / "big.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records(n_classes=25, per_class=1))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        os.path.join(ROOT, "train.py"),
    ] + args(
        d,
        name="ddp",
        mode="base",
        base_projects=d / "big.jsonl",
        save_base=d / "ddp_base",
        max_steps=4,
        eval_interval=2,
        # pairs only: recomputed below
        denoise_steps=0,
        denoise_every=0,
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (
        BART.from_pretrained(d / "ddp_base").config.vocab_size
        == BART.from_pretrained(d / "base").config.vocab_size
    )
    # tokens: the sum of what both ranks ran (each half of every global batch), recomputed here from
    # the data plan
    cfg, _ = train.parse_args(args(d, mode="base", denoise_steps=0), train.settings)
    train_r, _ = data.holdout(data.load_project(d / "big.jsonl"))
    src, tgt, _ = encode_pairs(
        load_tokenizer(d / "tokenizer.json"),
        train_r,
        cfg["max_src_len"],
        cfg["max_tgt_len"],
        src_key=f"src_{cfg['focal_context']}",
    )
    lengths, want, epoch, b = [len(s) + len(t) for s, t in zip(src, tgt)], 0, 0, 0
    for _step in range(4):
        plan = bucketed_batches(lengths, 2 * cfg["batch_size"], cfg["seed"], epoch)
        want += sum(len(tgt[i]) - 1 for i in plan[b])
        b = b + 1 if b + 1 < len(plan) else 0
        epoch += b == 0
    log = [json.loads(x) for x in open(d / "runs" / "ddp" / "log.jsonl")]
    assert log[-1]["step"] == 4 and log[-1]["tokens"] == want
    # each rank's own generator state
    rng = torch.load(d / "runs" / "ddp" / "last.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])
    # a rank's state cannot be dropped
    with pytest.raises(SystemExit, match=r"saved by 2 processes, this run has 1"):
        train.main(
            args(
                d,
                name="ddp",
                mode="base",
                base_projects=d / "big.jsonl",
                save_base=d / "ddp_base",
                max_steps=4,
                eval_interval=2,
                denoise_steps=0,
                denoise_every=0,
            )
        )


def test_attention_dropout_with_the_triton_kernel_is_a_printed_choice(workspace, tmp_path, capsys):
    """A checkpoint with attention_dropout = 0.1 customized with attn_impl=triton: the run's
    setting (0.0, which the kernel supports) replaces the checkpoint's, and says so; asking for
    both is refused before anything runs."""
    d, tok = workspace
    cfg = BART.from_pretrained(d / "base").config
    cfg.attention_dropout = 0.1
    BART(cfg).save_pretrained(tmp_path / "dropout_base")
    kw = dict(
        name="t",
        base=tmp_path / "dropout_base",
        out_dir=tmp_path / "runs",
        attn_impl="triton",
        strategy="lldb",
        max_steps=1,
        eval_interval=1,
    )
    with pytest.raises(
        SystemExit, match=r"attn_impl=triton has no attention dropout but attention_dropout=0.1"
    ):
        train.main(args(d, **kw, attention_dropout=0.1))
    model = train.main(args(d, **kw))
    assert (
        "attention_dropout: the checkpoint's 0.1 replaced by this run's 0.0"
        in capsys.readouterr().out
    )
    assert model.config.attention_dropout == 0.0 and model.config.attn_impl == "triton"


def test_resume_with_another_setting_is_refused_and_a_cut_log_line_survived(
    workspace, tmp_path, capsys
):
    """A rerun resumes only with the settings that made the run (another fold would train on its
    test fold), and a log line cut short by a kill is dropped with a message; a corrupt line
    elsewhere is an error naming the line."""
    d, _ = workspace
    # warmup 9: max_steps may change on resume up to step 9 (runs.check_schedule)
    kw = dict(
        name="r",
        strategy="lldb",
        max_steps=3,
        eval_interval=3,
        warmup_steps=9,
        out_dir=tmp_path / "runs",
    )
    train.main(args(d, **kw))
    with pytest.raises(
        SystemExit, match=r"other settings \(fold: 0 -> 1\).*another --name, or delete"
    ):
        train.main(args(d, **kw, fold=1))
    log = tmp_path / "runs" / "r" / "log.jsonl"
    lines = log.read_text().splitlines()
    # a kill in the middle of writing a line
    log.write_text("\n".join(lines) + "\n" + lines[-1][:25])
    # max_steps may change within the warmup: the run goes on
    train.main(args(d, **{**kw, "max_steps": 6}))
    assert "dropping a partial last line" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [0, 3, 6]
    log.write_text("{broken\n" + log.read_text())
    with pytest.raises(SystemExit, match=r"log.jsonl:1: corrupt log line"):
        train.main(args(d, **{**kw, "max_steps": 9}))
    import shutil  # the same base path holding another base: the run is not continued on it

    shutil.copytree(d / "base", tmp_path / "base")
    train.main(args(d, **{**kw, "name": "rb", "base": tmp_path / "base"}))
    torch.manual_seed(1)
    BART(BART.from_pretrained(tmp_path / "base").config).save_pretrained(tmp_path / "base")
    with pytest.raises(SystemExit, match=r"other settings \(base_checksum: "):
        train.main(args(d, **{**kw, "name": "rb", "base": tmp_path / "base", "max_steps": 6}))


def test_base_two_stages_and_training_json(workspace, tmp_path, capsys):
    """make base's shape: denoising steps, then supervised ones, each logged with its stage and
    source_gain; the saved base carries training.json; a customization inherits it and refuses a
    conflicting setting by name."""
    d, _ = workspace
    # base mode holds out 5% of the test classes: needs > 20
    with open(tmp_path / "big.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records(n_classes=25, per_class=2))
    train.main(
        args(
            d,
            name="b",
            mode="base",
            base_projects=tmp_path / "big.jsonl",
            save_base=tmp_path / "base",
            out_dir=tmp_path / "runs",
            denoise_steps=3,
            max_steps=6,
            focal_context="fm",
            max_src_len=40,
            max_tgt_len=48,
        )
    )
    log = [json.loads(x) for x in open(tmp_path / "runs" / "b" / "log.jsonl")]
    assert [(x["step"], x["stage"]) for x in log] == [(3, "denoise"), (6, "supervised")]
    assert all(
        x["source_gain"] > 0 and "val_loss_empty_source" in x and "encoder_spread" in x for x in log
    )
    train.main(
        args(
            d,
            name="mix",
            mode="base",
            base_projects=tmp_path / "big.jsonl",
            save_base=tmp_path / "mix",
            out_dir=tmp_path / "runs",
            denoise_steps=2,
            denoise_every=2,
            max_steps=6,
            eval_interval=3,
        )
    )
    # steps 0, 1 denoise; then 3, 5
    mix = [json.loads(x) for x in open(tmp_path / "runs" / "mix" / "log.jsonl")]
    assert [(x["step"], x["stage"], x["denoising_steps"]) for x in mix] == [
        (2, "denoise", 2),
        (3, "supervised", 2),
        (6, "supervised", 4),
    ]
    trained = json.load(open(tmp_path / "base" / "training.json"))
    assert {k: trained[k] for k in runs.CARRIED} == dict(
        tokenizer="tokenizer.json", focal_context="fm", max_src_len=40, max_tgt_len=48
    )
    # the folder is self-contained: its tokenizer, its log, the totals of the run, bf16 weights,
    # SHA256SUMS
    assert (tmp_path / "base" / "tokenizer.json").read_bytes() == (
        d / "tokenizer.json"
    ).read_bytes()
    assert (tmp_path / "base" / "log.jsonl").read_bytes() == (
        tmp_path / "runs" / "b" / "log.jsonl"
    ).read_bytes()
    assert trained["steps"] == 6 and trained["stages"][0]["denoising_steps"] == 3
    assert trained["pf_s_exact"] == log[-1]["pf_s_exact"] and trained["weights_dtype"] == "bf16"
    assert {t.dtype for t in load_file(tmp_path / "base" / "model.safetensors").values()} == {
        torch.bfloat16
    }
    sums = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "base", capture_output=True, text=True
    )
    assert sums.returncode == 0 and sums.stdout.count(": OK") == 5, sums.stdout + sums.stderr
    kw = dict(
        name="c", base=tmp_path / "base", out_dir=tmp_path / "runs", max_steps=3, eval_interval=3
    )
    with pytest.raises(
        SystemExit, match=r"--focal_context=fm_fc differs from the base's focal_context=fm"
    ):
        train.main(args(d, **kw, focal_context="fm_fc"))
    train.main(args(d, **kw))
    saved = json.load(open(tmp_path / "runs" / "c" / "config.json"))
    assert (saved["focal_context"], saved["max_src_len"], saved["max_tgt_len"]) == ("fm", 40, 48)


def test_a_base_goes_on_from_a_base_folder_as_a_next_stage(workspace, tmp_path):
    """--init_base: the next stage starts from the folder's weights (its first validation loss
    is the folder's last, to bf16 rounding, not a fresh model's), with the folder's tokenizer and
    lengths; the new training.json lists both stages with totals that are their sums, and the new
    log.jsonl both stages' lines, each with its base_stage. A conflicting preset, a folder without
    training.json, and --init_base in a customization are refused by name."""
    d, tok = workspace
    with open(tmp_path / "big.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records(n_classes=25, per_class=2))
    common = dict(mode="base", base_projects=tmp_path / "big.jsonl", out_dir=tmp_path / "runs")
    stage1 = dict(common, name="s1", save_base=tmp_path / "one", denoise_steps=2, max_steps=8)
    train.main(args(d, **stage1, focal_context="fm", max_src_len=40, max_tgt_len=48))
    first = json.load(open(tmp_path / "one" / "training.json"))
    # lr 1e-9: the weights barely move, so stage 2's first loss is stage 1's kept model's
    stage2 = dict(common, name="s2", save_base=tmp_path / "two", init_base=tmp_path / "one")
    train.main(args(d, **stage2, lr=1e-9, max_steps=3, eval_interval=3, denoise_every=2))
    trained = json.load(open(tmp_path / "two" / "training.json"))
    assert [s["settings"]["name"] for s in trained["stages"]] == ["s1", "s2"]
    assert trained["stages"][0] == first["stages"][0]
    for k in ("steps", "tokens", "pf_s_exact", "pf_s_paper", "seconds"):
        assert trained[k] == pytest.approx(first[k] + trained["stages"][1][k], rel=1e-12)
    settings = trained["stages"][1]["settings"]
    assert (settings["focal_context"], settings["max_src_len"], settings["denoise_steps"]) == (
        "fm",
        40,
        0,
    )
    assert settings["init_checksum"] == runs.checksum(tmp_path / "one")
    assert (tmp_path / "two" / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    log = [json.loads(x) for x in open(tmp_path / "two" / "log.jsonl")]
    one = [json.loads(x) for x in open(tmp_path / "one" / "log.jsonl")]
    assert [x["base_stage"] for x in log] == [1] * len(one) + [2]
    assert [{k: v for k, v in x.items() if k != "base_stage"} for x in log[: len(one)]] == one
    assert log[-1]["val_loss"] == pytest.approx(first["stages"][0]["best_val_loss"], abs=0.05)
    assert log[-1]["val_loss"] < 0.8 * math.log(tok.get_vocab_size())
    with pytest.raises(SystemExit, match=r"--preset=small differs from the base's preset=tiny"):
        train.main(args(d, **dict(stage2, name="s3", preset="small")))
    with pytest.raises(SystemExit, match=r"--init_base=.*: no training.json; a base goes on"):
        train.main(args(d, **dict(stage2, name="s4", init_base=d / "base")))
    with pytest.raises(SystemExit, match=r"--init_base=.* is for --mode=base"):
        train.main(args(d, name="s5", init_base=tmp_path / "one"))
    assert not (tmp_path / "runs" / "s3").exists() and not (tmp_path / "runs" / "s4").exists()


def test_word_dropout_masks_what_the_decoder_reads_in_pair_steps_only(
    workspace, tmp_path, monkeypatch
):
    """--word_dropout=1: in a pair step the decoder reads </s> then <mask> at every real
    position, against the same labels as without it; a denoising step's batch is left as collate
    made it."""
    d, tok = workspace
    seen, loss_fn = [], train.loss_fn
    monkeypatch.setattr(
        train, "loss_fn", lambda m, batch, ac: seen.append(batch) or loss_fn(m, batch, ac)
    )
    with open(tmp_path / "big.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records(n_classes=25, per_class=2))
    common = dict(
        mode="base",
        base_projects=tmp_path / "big.jsonl",
        out_dir=tmp_path / "runs",
        denoise_steps=0,
        denoise_every=2,
        max_steps=4,
        eval_interval=4,
    )
    for name, p in (("plain", 0.0), ("dropped", 1.0)):
        train.main(args(d, name=name, save_base=tmp_path / name, word_dropout=p, **common))
    plain, dropped = seen[:4], seen[4:]
    mask = tok.token_to_id("<mask>")
    # steps 1 and 3 (0-based) are denoising steps
    for step, (a, b) in enumerate(zip(plain, dropped)):
        assert torch.equal(a[3], b[3]) and torch.equal(a[0], b[0])
        if step % 2 == 1:
            assert torch.equal(a[2], b[2])
        else:
            real = b[3][:, 1:] != -100
            assert torch.equal(b[2][:, 0], a[2][:, 0]) and (b[2][:, 1:][real] == mask).all()
            assert torch.equal(b[2][:, 1:][~real], a[2][:, 1:][~real]) and not (a[2] == mask).any()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                "train.py",
                "--project={d}/notjson.jsonl",
                "--tokenizer={d}/tok.json",
                "--base={d}/no-base",
            ],
            r"^error: .*notjson.jsonl:1: not a UTF-8 JSON line",
        ),
        (
            ["train.py", "--mode=base", "--tokenizer={d}/notjson.jsonl"],
            r"^error: .*notjson.jsonl: not a tokenizer.json",
        ),
        (["evaluate.py", "{d}"], r"^error: .*: no config.json \(not a run folder\)"),
        (
            ["-m", "data.tokenizer", "--projects", "no-such-project", "--out", "{d}/t.json"],
            r"^error: unknown project",
        ),
    ],
)
def test_command_line_errors_are_one_line(tmp_path, argv, message):
    """An expected error at an entry point (data.cli) is one line naming the input, with no
    traceback."""
    import re

    (tmp_path / "notjson.jsonl").write_text("not json\n")
    train_tokenizer(["a b c"], vocab_size=280, min_frequency=1).save(str(tmp_path / "tok.json"))
    cmd = [sys.executable] + [a.format(d=tmp_path) for a in argv]
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-1500:]
    assert re.search(message, p.stderr.strip().splitlines()[-1]), p.stderr[-500:]


def cut_in_half(path):
    data_ = path.read_bytes()
    path.write_bytes(data_[: len(data_) // 2])
    return data_


def lldb_model(d):
    """The fixture's base with lldb applied: what a run's best.safetensors loads onto."""
    return strategies.apply(BART.from_pretrained(d / "base"), "lldb")


def test_a_cut_checkpoint_is_one_line_naming_it(workspace, tmp_path):
    """best.safetensors or last.pt cut to half its bytes (a full disk or a kill during an older
    version's save): loading the delta and resuming are one line naming the file and saying that
    the run must be retrained, not a traceback of the reader."""
    d, _ = workspace
    kw = dict(name="cut", strategy="lldb", max_steps=3, eval_interval=3, out_dir=tmp_path / "runs")
    train.main(args(d, **kw))
    run = tmp_path / "runs" / "cut"
    whole = cut_in_half(run / "best.safetensors")
    cut = (
        r"best.safetensors: cut short or corrupt.*the run must be retrained: delete .*cut and rerun"
    )
    with pytest.raises(ValueError, match=cut):
        runs.load_trainable(lldb_model(d), run / "best.safetensors")
    with pytest.raises(ValueError, match=cut):
        train.main(args(d, **kw))
    (run / "best.safetensors").write_bytes(whole)
    cut_in_half(run / "last.pt")
    with pytest.raises(
        SystemExit, match=r"last.pt: cut short or corrupt.*delete .*cut and rerun to retrain it"
    ):
        train.main(args(d, **kw))


def test_a_full_disk_during_a_checkpoint_save(workspace, tmp_path, monkeypatch):
    """A write that fails for want of space (ENOSPC, half the file written): one line naming the
    file and what to do; the previous checkpoint is intact and no temporary file is left."""
    import errno

    import safetensors.torch

    d, _ = workspace
    kw = dict(
        name="full",
        strategy="lldb",
        max_steps=3,
        eval_interval=3,
        warmup_steps=9,
        out_dir=tmp_path / "runs",
    )
    train.main(args(d, **kw))
    run = tmp_path / "runs" / "full"
    last = (run / "last.pt").read_bytes()

    def half_then_full(write):
        def fake(obj, path, *a, **k):
            write(obj, path, *a, **k)
            cut_in_half(Path(path))
            raise OSError(errno.ENOSPC, "No space left on device")

        return fake

    full = r": no space left on device: free space and rerun \(the run resumes from its last "
    monkeypatch.setattr(torch, "save", half_then_full(torch.save))
    with pytest.raises(SystemExit, match=r"last.pt" + full):
        train.main(args(d, **{**kw, "max_steps": 6}))
    assert (run / "last.pt").read_bytes() == last
    # (the evaluation before it may have written a better best.safetensors, whole)
    best = (run / "best.safetensors").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full(safetensors.torch.save_file))
    with pytest.raises(SystemExit, match=r"best.safetensors" + full):
        runs.save_trainable(lldb_model(d), run / "best.safetensors")
    assert (run / "best.safetensors").read_bytes() == best
    assert not [f for f in os.listdir(run) if f.startswith(".tmp-")]
    # log.jsonl is appended, not replaced: a full disk there is said the same way
    monkeypatch.undo()

    def no_room_for_log(path, mode="r", *a, **k):
        if str(path).endswith("log.jsonl") and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *a, **k)

    monkeypatch.setattr(runs, "open", no_room_for_log, raising=False)
    with pytest.raises(SystemExit, match=r"log.jsonl" + full):
        train.main(args(d, **{**kw, "max_steps": 6}))
    assert (run / "last.pt").read_bytes() == last


def test_a_failed_run_leaves_no_folder_it_made(workspace, tmp_path):
    """A run that fails after the data loaded but before its first checkpoint (here: the base
    cannot be loaded) removes the run folder this invocation made, and releases its lock (the
    same name then trains); a folder that was there before keeps its files."""
    d, _ = workspace
    out = tmp_path / "runs"
    kw = dict(strategy="lldb", max_steps=3, eval_interval=3, out_dir=out)
    with pytest.raises(FileNotFoundError, match="no-base"):
        train.main(args(d, **kw, name="made", base=tmp_path / "no-base"))
    assert not (out / "made").exists()
    train.main(args(d, **kw, name="made"))
    assert (out / "made" / "last.pt").is_file()
    # there before: an empty folder, and a run that refuses a late conflict (max_steps)
    (out / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no-base"):
        train.main(args(d, **kw, name="empty", base=tmp_path / "no-base"))
    assert (out / "empty").is_dir()
    files = sorted(os.listdir(out / "made"))
    with pytest.raises(SystemExit, match="--max_steps=6"):
        train.main(args(d, **{**kw, "max_steps": 6}, name="made"))
    assert sorted(os.listdir(out / "made")) == files


def test_a_resume_changes_max_steps_only_within_the_warmup(workspace, tmp_path):
    """max_steps sets the cosine decay's length: a resume past the supervised warmup with another
    max_steps would join two schedules, and is refused by name (config.json keeps the old
    value); within the warmup every learning rate so far is the same, and the run goes on."""
    d, _ = workspace
    kw = dict(strategy="lldb", max_steps=3, eval_interval=3, out_dir=tmp_path / "runs")
    train.main(args(d, **kw, name="past"))
    with pytest.raises(
        SystemExit,
        match=r"^--max_steps=6: .*past is at step 3 of a learning-rate schedule for max_steps=3 "
        r"\(its cosine decay after step 2\); .*keep --max_steps=3, or train a new run \(another",
    ):
        train.main(args(d, **{**kw, "max_steps": 6}, name="past"))
    assert json.load(open(tmp_path / "runs" / "past" / "config.json"))["max_steps"] == 3
    train.main(args(d, **kw, name="within", warmup_steps=5))
    train.main(args(d, **{**kw, "max_steps": 5}, name="within", warmup_steps=5))
    log = (tmp_path / "runs" / "within" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [0, 3, 5]


def test_a_resume_keeps_the_dtype_auto_resolved_to(workspace, tmp_path, monkeypatch):
    """--dtype=auto resolved to one dtype on the machine that started the run: on a machine where
    it resolves to the other, the resume is refused naming both; --dtype=<the saved one> given
    explicitly resumes it."""
    d, _ = workspace
    kw = dict(name="dt", strategy="lldb", max_steps=6, eval_interval=3, out_dir=tmp_path / "runs")
    # stopped by the time limit after its first step: a rerun without it goes on
    train.main(args(d, **kw, dtype="auto", max_minutes=1e-6))
    config = tmp_path / "runs" / "dt" / "config.json"
    saved = json.load(open(config))["resolved"]["dtype"]
    other = {"bf16": "fp32", "fp32": "bf16"}[saved]
    monkeypatch.setattr(train, "native_bf16", lambda cuda: other == "bf16")
    with pytest.raises(
        SystemExit,
        match=rf"dt was trained in {saved} \(config.json: resolved.dtype\) but would resume in "
        rf"{other} \(--dtype=auto on this machine\): pass --dtype={saved} to resume it",
    ):
        train.main(args(d, **kw, dtype="auto"))
    train.main(args(d, **kw, dtype=saved))
    assert json.load(open(config))["resolved"]["dtype"] == saved
    log = (tmp_path / "runs" / "dt" / "log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 6
