"""serve.py: many runs' deltas over one base, mixed row by row in one batch. The reference is each
customized model alone (base + strategy + delta, model.generate on that run's rows only): every row
of a mixed batch must generate its sequences exactly, and its scores up to float rounding, greedy
and beam 5, with three runs per strategy whose outputs differ from each other and from the base (so
a server that ignored a delta would fail). Then the command: requests from run folders, the bad ones
refused one by one while the rest are served; bad arguments (no run, two runs of one folder name,
an --out that cannot be written) refused in one line before any model loads.

PYTHONPATH=. .venv/bin/python -m pytest tests/test_serve.py -q"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import runs
import serve
import strategies
from data.tokenizer import EOS, PAD, encode_pairs
from model import BART, BARTConfig

CFG = BARTConfig(
    vocab_size=512,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    max_position_embeddings=64,
    dropout=0.0,
)
OPTS = {
    "custom": {},
    "leo": dict(layernorm=True),
    "lldb": {},
    "prefix": dict(prefix_len=8),
    "lora": dict(r=4),
}
# each delta moves the output
SCALE = {"custom": 0.1, "leo": 0.05, "lldb": 0.05, "prefix": 3.0, "lora": 0.5}


def base():
    torch.manual_seed(0)
    model = BART(CFG).eval()
    # a random model ends at once: make every sequence run its full length
    model.final_logits_bias[0, EOS] = -8.0
    return model


def customized(kind, seed, **options):
    """base + strategy + a random delta (a LoRA's B starts at zero: every trainable tensor
    moved)."""
    model = strategies.apply(base(), kind, **{**OPTS[kind], **options})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in strategies.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * SCALE[kind])
    return model.eval()


def server_of(models):
    deltas = {
        n: (m.strategy, {k: v.clone() for k, v in runs.trainable_state_dict(m).items()})
        for n, m in models.items()
    }
    return serve.Server(base(), deltas)


def inputs(n, seed=5, S=11):
    g = torch.Generator().manual_seed(seed)
    ids, mask = (
        torch.randint(4, CFG.vocab_size, (n, S), generator=g),
        torch.ones(n, S, dtype=torch.long),
    )
    for b in range(n):
        mask[b, S - b % 4 :] = 0  # ragged, right-padded
    return ids, mask


def assert_rows_equal_alone(server, models, names, beams):
    ids, mask = inputs(len(names))
    kw = dict(num_beams=beams, num_return_sequences=beams, max_new_tokens=8)
    seqs, scores = server.generate(names, ids, mask, **kw)
    for name in set(names):
        rows = [i for i, n in enumerate(names) if n == name]
        # alone, the batch is only as long as its own longest source
        S = int(mask[rows].sum(1).max())
        alone, alone_scores = models[name].generate(ids[rows, :S], mask[rows, :S], **kw)
        for j, i in enumerate(rows):
            got, want = seqs[i * beams : (i + 1) * beams], alone[j * beams : (j + 1) * beams]
            T = max(got.shape[1], want.shape[1])
            padded = [F.pad(s, (0, T - s.shape[1]), value=PAD) for s in (got, want)]
            assert torch.equal(*padded), name
            # the same products summed in another order (LoRA: a batched matmul per row instead of
            # one GEMM)
            torch.testing.assert_close(
                scores[i * beams : (i + 1) * beams],
                alone_scores[j * beams : (j + 1) * beams],
                rtol=1e-5,
                atol=1e-5,
            )


def assert_deltas_matter(models):
    ids, mask, kw = *inputs(4, seed=9), dict(num_beams=5, num_return_sequences=5, max_new_tokens=8)
    outs = [str(m.generate(ids, mask, **kw)[0].tolist()) for m in [base(), *models.values()]]
    assert len(set(outs)) == len(outs), (
        "two runs (or a run and the base) generate the same: the test could not fail"
    )


@pytest.mark.parametrize("beams", [1, 5])
def test_lora_lldb_leo_runs_mixed_in_one_batch_generate_what_each_generates_alone(beams):
    models = {
        f"{kind}{i}": customized(kind, 10 * j + i, **({"r": 2 + 2 * i} if kind == "lora" else {}))
        # LoRA ranks 2, 4, 6: zero-padded in the bank
        for j, kind in enumerate(serve.SHARED)
        for i in range(3)
    }
    assert_deltas_matter(models)
    server = server_of(models)
    assert set(server.family.values()) == {"shared"} and not server.solo
    names = [
        "lora0",
        "lldb1",
        "leo2",
        "lora1",
        "lldb0",
        "leo0",
        "lora2",
        "lldb2",
        "leo1",
        "lora0",
        "lldb1",
        "leo2",
    ]
    assert_rows_equal_alone(server, models, names, beams)
    for kind in serve.SHARED:  # one strategy at a time: three runs of it in one batch
        assert_rows_equal_alone(server, models, [f"{kind}{i % 3}" for i in range(5)], beams)


@pytest.mark.parametrize("beams", [1, 5])
def test_prefix_runs_in_one_batch_and_solo_runs_generate_what_each_generates_alone(beams):
    models = {f"prefix{i}": customized("prefix", 40 + i) for i in range(3)}
    models |= {
        "custom": customized("custom", 50),
        "prefix_short": customized("prefix", 60, prefix_len=3),
    }
    assert_deltas_matter(models)
    server = server_of(models)
    # no base to share; another prefix shape than the bank's
    assert set(server.solo) == {"custom", "prefix_short"}
    assert_rows_equal_alone(
        server, models, ["prefix0", "prefix2", "prefix1", "prefix2", "prefix0"], beams
    )
    # one run's batch: its prefix, not the bank
    assert_rows_equal_alone(server, models, ["prefix1"] * 3, beams)
    for solo in server.solo:
        assert_rows_equal_alone(server, models, [solo] * 3, beams)
    with pytest.raises(ValueError, match="one family"):
        server.generate(["prefix0", "custom"], *inputs(2))


def run_folders(tmp_path):
    """A tokenizer, two tiny bases and four run folders under tmp_path: a-lora and b-lldb on
    "base", c-lldb on "other_base", d-lldb on "base" with another focal context. -> (tokenizer,
    the six sources it was trained on)."""
    from data.tokenizer import train_tokenizer

    srcs = [f"Foo{i} {{ int m{i}(int a) {{ return a + {i}; }} }}" for i in range(6)]
    tests = [f"@Test public void testM{i}() {{ }}" for i in range(6)]
    tok = train_tokenizer(srcs + tests, vocab_size=300, min_frequency=1)
    tok.save(str(tmp_path / "tok.json"))
    tiny = dict(
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
    for seed, name in ((0, "base"), (1, "other_base")):
        torch.manual_seed(seed)
        BART(BARTConfig(**tiny)).save_pretrained(tmp_path / name)
    for run, kind, on, fc in (
        ("a-lora", "lora", "base", "fm_fc"),
        ("b-lldb", "lldb", "base", "fm_fc"),
        ("c-lldb", "lldb", "other_base", "fm_fc"),
        ("d-lldb", "lldb", "base", "fm"),
    ):
        model = strategies.apply(BART.from_pretrained(tmp_path / on), kind)
        with torch.no_grad():
            for p in strategies.trainable_parameters(model):
                p.normal_(std=0.5)
        (tmp_path / run).mkdir()
        runs.save_trainable(model, str(tmp_path / run / "best.safetensors"))
        cfg = dict(
            base=str(tmp_path / on),
            base_checksum=runs.checksum(tmp_path / on),
            tokenizer=str(tmp_path / "tok.json"),
            focal_context=fc,
            max_src_len=32,
            max_tgt_len=6,
            strategy=kind,
            strategy_options={},
        )
        (tmp_path / run / "config.json").write_text(json.dumps(cfg))
    return tok, srcs


def test_requests_are_served_from_run_folders_and_bad_ones_refused_one_by_one(tmp_path, capsys):
    tok, srcs = run_folders(tmp_path)
    (tmp_path / "Foo.java").write_text("class Foo { int m3(int a) { return a + 3; } }")
    reqs = [
        {"id": "java", "run": "a-lora", "java": str(tmp_path / "Foo.java"), "method": "m3"},
        {"id": "src", "run": str(tmp_path / "b-lldb"), "src": srcs[2]},
        {"id": "nomethod", "run": "a-lora", "java": str(tmp_path / "Foo.java"), "method": "absent"},
        {"id": "unknown", "run": "z-prefix", "src": srcs[1]},
        {"id": "otherbase", "run": "c-lldb", "src": srcs[1]},
        {"id": "otherfc", "run": "d-lldb", "src": srcs[1]},
        {"id": "src2", "run": "a-lora", "src": srcs[4]},
    ]
    # not an object
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs) + "7\n")
    dirs = ",".join(str(tmp_path / r) for r in ("a-lora", "b-lldb", "c-lldb", "d-lldb"))
    evaluate.main(
        [
            "generate",
            "--runs",
            dirs,
            "--requests",
            str(tmp_path / "req.jsonl"),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--k",
            "2",
            "--beams",
            "3",
        ]
    )
    assert "3 requests served, 5 refused" in capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    # a line that is not a request: no id, its line number
    assert [x["id"] for x in lines] == [r["id"] for r in reqs] + [None]
    assert lines[-1]["line"] == 8
    errors = {x["id"]: x["error"] for x in lines if "error" in x}
    assert set(errors) == {"nomethod", "unknown", "otherbase", "otherfc", None}
    assert "req.jsonl:8: not a JSON object" in errors[None]
    assert "no method 'absent'" in errors["nomethod"] and "its methods: m3" in errors["nomethod"]
    assert "unknown run 'z-prefix'" in errors["unknown"] and "another base" in errors["otherbase"]
    assert "another focal_context than" in errors["otherfc"]
    served = {x["id"]: x["tests"] for x in lines if "tests" in x}
    assert all(len(t) == 2 and t[0]["score"] >= t[1]["score"] for t in served.values())
    # each served request: what that run's customized model alone writes (runs.load_models: base +
    # strategy + delta)
    for rid, run in (("java", "a-lora"), ("src", "b-lldb")):
        cfg = runs.run_config(tmp_path / run)
        model = runs.load_models(str(tmp_path / run), cfg, tok.get_vocab_size())[1]
        # the file's method as data/ mines it
        src = serve.source_of(next(r for r in reqs if r["id"] == rid), cfg)
        ids = torch.tensor(encode_pairs(tok, [{"src": src, "tgt": ""}], cfg["max_src_len"])[0])
        seqs, scores = model.generate(
            ids, torch.ones_like(ids), num_beams=3, num_return_sequences=2, max_new_tokens=6
        )
        assert [t["code"] for t in served[rid]] == tok.decode_batch(seqs.tolist())
        torch.testing.assert_close(
            torch.tensor([t["score"] for t in served[rid]]), scores, rtol=1e-5, atol=1e-5
        )
    # files that cannot be read fail before any model loads
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a UTF-8 JSON line"):
        serve.main(dirs.split(","), tmp_path / "bad.jsonl", tmp_path / "out2.jsonl")
    assert not (tmp_path / "out2.jsonl").exists()


def test_a_request_without_an_id_gets_null_and_its_line_which_no_request_id_can_equal(tmp_path):
    """A line that is not a JSON object, or a request without an "id", is answered with "id":
    null and "line": its line number in the file (blank lines counted, as in data.read_jsonl's
    errors), not with a number a real request's id could also be. One output line per request
    line; a request with an id keeps its output line as it was."""
    tok, srcs = run_folders(tmp_path)
    request_lines = [
        json.dumps({"id": 1, "run": "a-lora", "src": srcs[0]}),
        "",
        "[1, 2]",
        json.dumps({"run": "a-lora", "src": srcs[1]}),
        json.dumps({"id": 2, "run": "a-lora", "src": srcs[2]}),
        "3",
    ]
    requests = tmp_path / "req.jsonl"
    requests.write_text("\n".join(request_lines) + "\n")
    out = tmp_path / "out.jsonl"
    returned = serve.main([str(tmp_path / "a-lora")], requests, out, 1, 1, 2)
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert written == returned
    assert [x["id"] for x in written] == [1, None, None, 2, None]
    assert [x.get("line") for x in written] == [None, 3, 4, None, 6]
    assert written[1] == {
        "id": None,
        "line": 3,
        "run": None,
        "error": f'{requests}:3: not a JSON object: a request is {{"id": ..., "run": ..., and '
        '"src", or "java" and "method"}',
    }
    # the served ones: a request with an id has its output line as before
    assert [sorted(written[i]) for i in (0, 2, 3)] == [
        ["id", "run", "tests"],
        ["id", "line", "run", "tests"],
        ["id", "run", "tests"],
    ]
    assert written[4]["error"].startswith(f"{requests}:6: not a JSON object")


# bad arguments of the command (python serve.py and evaluate.py generate --runs): one line that
# names the input and says what to do, before any model loads, and nothing written


def serve_py(argv):
    serve.cli(argv)


def evaluate_generate(argv):
    evaluate.main(["generate", *argv])


def command_line(tmp_path, run_list, out=None):
    """The arguments of a command over a one-request file; --out tmp_path/out.jsonl unless given."""
    requests = tmp_path / "req.jsonl"
    requests.write_text(json.dumps({"id": 1, "run": "a-lora", "src": "int m() {}"}) + "\n")
    if out is None:
        out = tmp_path / "out.jsonl"
    return ["--runs", run_list, "--requests", str(requests), "--out", str(out)]


def refused(entry, argv, tmp_path, monkeypatch):
    """Runs a command line that must be refused before any model loads, through data.cli as the
    entry points run it: -> the line it exits with. Nothing may be written under tmp_path."""

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(serve, "load", no_load)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        data.cli(entry, argv)
    assert sorted(tmp_path.rglob("*")) == before
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line
    return line


NO_RUN = (
    "error: --runs names no run folder: give one or more run folders, comma-separated "
    "(--runs runs/a-lora-f0,runs/b-lldb-f0)"
)


@pytest.mark.parametrize("entry", [serve_py, evaluate_generate])
def test_runs_naming_no_run_folder_is_refused_in_one_line(entry, tmp_path, monkeypatch):
    for run_list in (",", ",,"):
        argv = command_line(tmp_path, run_list)
        assert refused(entry, argv, tmp_path, monkeypatch) == NO_RUN


def test_serve_py_with_no_run_exits_non_zero_with_one_line_and_no_traceback(tmp_path):
    argv = command_line(tmp_path, "")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "serve.py", *argv],
        cwd=Path(serve.__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.splitlines() == [NO_RUN]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("entry", [serve_py, evaluate_generate])
def test_two_runs_with_one_folder_name_are_refused_naming_both_paths(entry, tmp_path, monkeypatch):
    a = str(tmp_path / "a" / "x-lldb-f0")
    b = str(tmp_path / "b" / "x-lldb-f0")
    line = refused(entry, command_line(tmp_path, f"{a},{b}"), tmp_path, monkeypatch)
    assert line == (
        f"error: --runs: {a} and {b} have the same folder name x-lldb-f0, by which a request "
        "names its run: serve them in separate commands, or give one a folder of another name"
    )
    # the same folder twice
    line = refused(entry, command_line(tmp_path, f"{a},{a}/"), tmp_path, monkeypatch)
    assert line == f"error: --runs names {a} twice: give each run once"


@pytest.mark.parametrize(
    "case", ["a folder", "ends in /", "under a file", "no folder", "read-only"]
)
@pytest.mark.parametrize("entry", [serve_py, evaluate_generate])
def test_an_out_that_cannot_be_written_is_refused_before_any_model_loads(
    entry, case, tmp_path, monkeypatch
):
    (tmp_path / "afile").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        # root writes anywhere: the folder is read-only to the check as it is to everyone else
        access = os.access

        def no_write_in_ro(path, mode, **kw):
            if Path(path) == ro and mode & os.W_OK:
                return False
            return access(path, mode, **kw)

        monkeypatch.setattr(os, "access", no_write_in_ro)
    out, why = {
        "a folder": (
            str(tmp_path),
            f"is a folder: give the path of a file, such as {tmp_path / 'tests.jsonl'}",
        ),
        "ends in /": (
            f"{tmp_path}/new/",
            f"is a folder: give the path of a file, such as {tmp_path / 'new' / 'tests.jsonl'}",
        ),
        "under a file": (
            f"{tmp_path}/afile/out.jsonl",
            f"{tmp_path / 'afile'} is a file, not a folder: give a path in a folder",
        ),
        "no folder": (
            f"{tmp_path}/no/such/out.jsonl",
            f"there is no folder {tmp_path / 'no' / 'such'}: create it, or give a path in a "
            "folder that exists",
        ),
        "read-only": (
            f"{ro}/out.jsonl",
            f"the folder {ro} is not writable: give a path in a folder you can write to",
        ),
    }[case]
    sep = ": "
    if why.startswith("is a folder"):
        sep = " "
    line = refused(entry, command_line(tmp_path, "a-lora", out), tmp_path, monkeypatch)
    ro.chmod(0o755)
    assert line == f"error: --out {out}{sep}{why}"


def test_a_row_index_without_a_prefix_reaches_the_triton_kernel_as_none():
    """lora/lldb/leo batches pass model.generate a route and no prefix: prefix_index is the
    prefix bank's index only, so the attention calls get none (Attention.attend hands the kernel
    an index only with a prefix). The Triton path (here in its CPU interpreter) against sdpa
    alone."""
    models = {"lora0": customized("lora", 1), "lldb0": customized("lldb", 2)}
    server = server_of(models)
    server.base.config.attn_impl = "triton"  # one config object for every layer of the base
    ids, mask = inputs(2)
    seqs, scores = server.generate(["lora0", "lldb0"], ids, mask, max_new_tokens=3)
    for i, name in enumerate(("lora0", "lldb0")):
        alone, alone_scores = models[name].generate(
            ids[i : i + 1], mask[i : i + 1], max_new_tokens=3
        )
        assert torch.equal(seqs[i : i + 1, : alone.shape[1]], alone)
        torch.testing.assert_close(scores[i : i + 1], alone_scores, rtol=1e-4, atol=1e-4)


def test_lldb_runs_mixed_while_inputs_finish_at_different_steps():
    """Inputs that finish early leave model.generate's batch: an lldb group then holds fewer rows
    while another group goes on, and the cross-attention K/V slices the bank keeps per group must
    be taken again. Beam 5, EOS made likelier (the fixture's bias and inputs chosen so that this
    happens, which the test checks)."""
    models = {f"lldb{i}": customized("lldb", 70 + i) for i in range(2)}
    server = server_of(models)
    for m in [server.base, *models.values()]:
        m.final_logits_bias[0, EOS] = 0.6
    block, groups = server.base.model.decoder.layers[-1], []
    assert isinstance(block, serve.GroupedBlock)
    hook = block.register_forward_pre_hook(
        lambda mod, args, kwargs: groups.append(
            {int(u): len(r) for u, r in serve.variant_groups(mod.variant_of, kwargs["route"])}
        ),
        with_kwargs=True,
    )
    assert_rows_equal_alone(server, models, ["lldb0"] * 4 + ["lldb1"] * 2, 5)
    hook.remove()
    shrank = [
        len(g) > 1 and any(0 < g.get(u, 0) < n for u, n in prev.items())
        for prev, g in zip(groups, groups[1:])
    ]
    assert any(shrank), (
        f"a group should lose rows while another goes on (rows per group and step: {groups})"
    )


def test_a_missing_requests_file_is_one_line_that_says_what_to_give(tmp_path):
    with pytest.raises(ValueError, match=r"^--requests .*nothere.jsonl: no such file: give a JSON"):
        serve.main([str(tmp_path / "run")], tmp_path / "nothere.jsonl", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_run_whose_delta_is_cut_short_is_refused_and_the_others_served(tmp_path):
    """best.safetensors cut to half its bytes (a full disk, a kill): that run's requests get the
    reason, naming the file; the other runs are served."""
    tok, srcs = run_folders(tmp_path)
    delta = tmp_path / "b-lldb" / "best.safetensors"
    delta.write_bytes(delta.read_bytes()[: delta.stat().st_size // 2])
    reqs = [
        {"id": "cut", "run": "b-lldb", "src": srcs[1]},
        {"id": "ok", "run": "a-lora", "src": srcs[2]},
    ]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    runs_given = [str(tmp_path / "a-lora"), str(tmp_path / "b-lldb")]
    serve.main(
        runs_given, tmp_path / "req.jsonl", tmp_path / "out.jsonl", k=1, beams=2, max_new_tokens=4
    )
    lines = {x["id"]: x for x in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert "best.safetensors: cut short or corrupt" in lines["cut"]["error"]
    assert "error" not in lines["ok"] and len(lines["ok"]["tests"]) == 1
