"""serve.py: many runs' deltas over one base, mixed row by row in one batch. The reference is each
customized model alone (base + strategy + delta, model.generate on that run's rows only): every row
of a mixed batch must generate its sequences exactly, and its scores up to float rounding, greedy
and beam 5, with three runs per strategy whose outputs differ from each other and from the base (so
a server that ignored a delta would fail). Then the command: requests from run folders, the bad ones
refused one by one while the rest are served.

PYTHONPATH=. .venv/bin/python -m pytest tests/test_serve.py -q"""

import json

import pytest
import torch
import torch.nn.functional as F

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


def test_requests_are_served_from_run_folders_and_bad_ones_refused_one_by_one(tmp_path, capsys):
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
    # a line that is not a request: its number
    assert [x["id"] for x in lines] == [r["id"] for r in reqs] + [7]
    errors = {x["id"]: x["error"] for x in lines if "error" in x}
    assert set(errors) == {"nomethod", "unknown", "otherbase", "otherfc", 7}
    assert "request 8 is not a JSON object" in errors[7]
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
    with pytest.raises(PermissionError, match=r"is missing or not writable"):
        serve.main(dirs.split(","), tmp_path / "req.jsonl", tmp_path / "no" / "such" / "out.jsonl")
    assert not (tmp_path / "out2.jsonl").exists()


def test_a_row_index_without_a_prefix_reaches_the_triton_kernel_as_none():
    """lora/lldb/leo batches pass model.generate a row index and no prefix; the Triton kernel
    (here in its CPU interpreter) takes an index only with a prefix bank: model.attention_triton
    drops it. Against sdpa alone."""
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
