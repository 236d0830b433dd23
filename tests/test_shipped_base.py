"""The shipped base (checkpoints/base/, the stand-in for AthenaTest's unreleased weights) and
what made it: its files check against SHA256SUMS with coreutils' sha256sum and a changed byte is
refused by the loader; training.json holds what customization reads and totals that agree with
its own log; the base reads its input on Java it never saw (the fixture project); and the pieces
of its recipe: bf16 autocast against the fp32 loss, the whole-Java denoising text. Run: `make
test`."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import losses
import runs
from data import denoise, mine
from data.batch import collate
from data.tokenizer import encode_pairs, load_tokenizer
from model import BART, PRESETS, config_from_preset

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "base"
FIXTURE = ROOT / "tests" / "fixtures" / "java" / "rules"


def test_files_match_sha256sums_and_a_changed_byte_is_refused(tmp_path):
    sums = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=SHIPPED, capture_output=True, text=True
    )
    assert sums.returncode == 0, sums.stdout + sums.stderr
    listed = {line.split()[1] for line in (SHIPPED / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.name for p in SHIPPED.iterdir()} - {"SHA256SUMS"}
    copy = tmp_path / "base"
    shutil.copytree(SHIPPED, copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of the last tensor's last element
    (copy / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(
        ValueError, match=r"model.safetensors: sha256 .* is not the .*SHA256SUMS records"
    ):
        BART.from_pretrained(copy)


def test_training_json_is_what_the_loader_expects():
    trained = json.loads((SHIPPED / "training.json").read_text())
    assert set(runs.CARRIED) <= set(trained) and (SHIPPED / trained["tokenizer"]).is_file()
    model = BART.from_pretrained(SHIPPED)
    preset = config_from_preset(
        trained["preset"], vocab_size=load_tokenizer(SHIPPED / "tokenizer.json").get_vocab_size()
    )
    assert (
        model.config.d_model == preset.d_model
        and model.num_parameters() == BART(preset).num_parameters()
    )
    assert trained["preset"] in PRESETS and trained["weights_dtype"] == "bf16"
    # the totals are the stages' sums; each stage's PF-s and steps are its last log line's, and
    # its kept step the one of its lowest supervised validation loss
    stages = trained["stages"]
    for k in ("steps", "tokens", "pf_s_exact", "pf_s_paper"):
        assert trained[k] == pytest.approx(sum(s[k] for s in stages), rel=1e-12)
    log = [json.loads(line) for line in (SHIPPED / "log.jsonl").read_text().splitlines()]
    assert {x.get("base_stage", 1) for x in log} == set(range(1, len(stages) + 1))
    for n, stage in enumerate(stages, 1):
        lines = [x for x in log if x.get("base_stage", 1) == n]
        assert lines[-1]["pf_s_exact"] == pytest.approx(stage["pf_s_exact"], rel=1e-12)
        assert lines[-1]["step"] == stage["steps"]
        supervised = [x for x in lines if x["stage"] == "supervised"]
        assert min(supervised, key=lambda x: x["val_loss"])["step"] == stage["best_step"]


def test_reads_its_input_on_java_it_never_saw(tmp_path):
    """source_gain on the fixture project's pairs (a project in no corpus): the perplexity of
    each test with another focal class's source over the perplexity with its own. 1.0 means the
    base ignores its input."""
    records = mine.mine(FIXTURE, "rules", warn=lambda *a, **k: None)[0]
    trained = json.loads((SHIPPED / "training.json").read_text())
    tok = load_tokenizer(SHIPPED / trained["tokenizer"])
    src, tgt, _ = encode_pairs(
        tok,
        records,
        trained["max_src_len"],
        trained["max_tgt_len"],
        src_key=f"src_{trained['focal_context']}",
    )
    classes = [r["focal_class"]["identifier"] for r in records]
    other = [
        next(j for j in range(len(records)) if classes[j] != classes[i])
        for i in range(len(records))
    ]
    model = BART.from_pretrained(SHIPPED)
    targets = [t[1:] for t in tgt]
    nll = losses.source_nll(model, src, targets, [src[j] for j in other], 8, "cpu")
    own = sum(s for s, _ in nll[0]) / sum(n for _, n in nll[0])
    swapped = sum(s for s, _ in nll[1]) / sum(n for _, n in nll[1])
    assert len(records) >= 8 and torch.tensor(swapped - own).exp() > 1.2


def test_bf16_autocast_loss_is_the_fp32_loss_to_bf16_precision():
    """One batch through the tiny preset: the loss under bf16 autocast (fp32 weights) against the
    fp32 loss."""
    torch.manual_seed(0)
    model = BART(config_from_preset("tiny", vocab_size=512, dropout=0.0)).eval()
    src = [[0] + torch.randint(4, 512, (n,)).tolist() + [2] for n in (17, 40, 63)]
    tgt = [[0] + torch.randint(4, 512, (n,)).tolist() + [2] for n in (9, 33, 50)]
    batch = collate(src, tgt, "cpu")
    fp32 = losses.loss_fn(model, batch, torch.autocast("cpu", enabled=False)).item()
    bf16 = losses.loss_fn(model, batch, torch.autocast("cpu", dtype=torch.bfloat16)).item()
    assert bf16 != fp32 and abs(bf16 - fp32) / fp32 < 1e-2


def test_whole_java_denoising_text(tmp_path):
    """Every .java file but the excluded ones, the licence header dropped, whitespace collapsed,
    in a seeded order, capped at max_chars; a project without a source tree is an error naming
    the command that fetches it."""
    root = tmp_path / "src"
    (root / "p" / "a").mkdir(parents=True)
    (root / "p" / "a" / "A.java").write_text(
        "/* Licence\n * text */\npackage a;\n\nclass A {\n  int x;\n}\n"
    )
    (root / "p" / "a" / "B.java").write_text(
        "import java.util.List;\nclass B { List<String> y; }\n"
    )
    (root / "p" / "a" / "BTest.java").write_text("package a;\nclass BTest {}\n")
    (root / "p" / "notes.txt").write_text("not Java")
    texts = denoise.java_files(["p"], {("p", "a/BTest.java")}, max_chars=10_000, src_root=root)
    assert sorted(texts) == [
        "import java.util.List; class B { List<String> y; }",
        "package a; class A { int x; }",
    ]
    assert texts == denoise.java_files(
        ["p"], {("p", "a/BTest.java")}, max_chars=10_000, src_root=root
    )
    capped = denoise.java_files(["p"], set(), max_chars=60, src_root=root)
    # a file that would cross the cap is left out
    assert sum(map(len, capped)) <= 60 and 0 < len(capped) < 3
    with pytest.raises(
        FileNotFoundError, match=r"'q' has no source tree .*`python -m data.fetch q`"
    ):
        denoise.java_files(["q"], set(), max_chars=10, src_root=root)
