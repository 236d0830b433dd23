"""evaluate.py against outside references: sacrebleu called directly (BLEU-4), HF transformers'
loss on the same weights (perplexity), hand-computed top-k matches and syntax shares,
scikit-learn (style cosine), scipy (Kruskal- Wallis); bad inputs; the run-folder contract end to
end on a tiny random model. CPU, about 30 s on 2 busy cores. Run: `make test` or
`.venv/bin/python -m pytest tests/test_evaluate.py -q`."""

import json
import math

import numpy as np
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from scipy.stats import kruskal
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

import abstract_java
import data
import evaluate as ev
import losses
import runs
import serve
from data.batch import pad
from model import BART, BARTConfig

transformers = pytest.importorskip("transformers")
TINY = dict(
    vocab_size=300,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=128,
    dropout=0.0,
)
T0 = "@Test public void testFoo() { Foo f = new Foo(); assertEquals(1, f.size()); }"
T1 = '@Test public void testNull() { assertNull(map.get("k")); }'


def test_bleu4_is_sacrebleu_on_java_tokens():
    hyps = [T0.replace("1", "2"), "@Test public void t() { }", T1]
    refs = [T0, "@Test public void testX() { x.run(); }", T1.replace("get", "remove")]

    def lex(c):
        return " ".join(abstract_java.java_tokens(c))

    want = sacrebleu.corpus_bleu(
        [lex(h) for h in hyps], [[lex(r) for r in refs]], tokenize="none"
    ).score
    assert ev.bleu4(hyps, refs) == pytest.approx(want, abs=1e-9)
    assert 0 < want < 100 and ev.bleu4(refs, refs) == pytest.approx(100.0)


@pytest.mark.parametrize("impl", ["math", "sdpa"])  # evaluate.load_models runs sdpa
def test_perplexity_is_exp_of_hf_loss(tmp_path, impl):
    """Per-token perplexity = exp(HF's mean loss over labels t1..tn </s>); per example: mean of
    exp(loss_i)."""
    torch.manual_seed(0)
    ours = BART(BARTConfig(**TINY, attn_impl=impl)).eval()
    with torch.no_grad():
        ours.final_logits_bias.normal_(std=0.5)
    ours.save_pretrained(tmp_path / "m")
    hf = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    g = torch.Generator().manual_seed(1)

    # t1..tn </s>, as train.py's labels
    def rand(n):
        return torch.randint(3, 300, (n,), generator=g).tolist() + [2]

    src, tgt = [rand(n) for n in (9, 4, 12, 6, 1)], [rand(n) for n in (5, 11, 2, 7, 3)]
    ppl, ppl_mean = ev.perplexity(*zip(*losses.target_nll(ours, src, tgt, batch_size=2)))

    def hf_loss(s, t):  # right-padded batch, labels -100 at pads; HF shifts labels right itself
        ids, mask = pad(s)
        labels = pad(t)[0].masked_fill(pad(t)[1] == 0, -100)
        with torch.no_grad():
            return float(hf(input_ids=ids, attention_mask=mask, labels=labels).loss)

    assert ppl == pytest.approx(math.exp(hf_loss(src, tgt)), rel=1e-5)
    assert ppl_mean == pytest.approx(
        np.mean([math.exp(hf_loss([s], [t])) for s, t in zip(src, tgt)]), rel=1e-5
    )


def test_source_gain_high_on_a_copy_task_and_exactly_one_without_cross_attention():
    """source_gain = perplexity with another example's source / with the own source
    (docs/source-gain.md), on two models: a tiny BART trained to copy its source (it must read
    it: the gain is far above 1), and the same model with every cross-attention value projection
    zeroed, so that cross-attention returns out_proj's bias whatever the source (what a collapsed
    encoder amounts to): the gain is exactly 1. Batches of one example keep every decoder
    computation the same shape on both sides, so "exactly" holds to the last bit."""
    torch.manual_seed(0)
    model = BART(
        BARTConfig(**{**TINY, "d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128})
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(300):  # copy 8 random tokens: x -> x </s>
        x = torch.randint(4, 300, (32, 8))
        dec = torch.cat([torch.full((32, 1), 2), x], 1)  # </s> x
        labels = torch.cat([x, torch.full((32, 1), 2)], 1)  # x </s>
        loss = F.cross_entropy(model(x, torch.ones_like(x), dec).flatten(0, 1), labels.flatten())
        loss.backward(), opt.step(), opt.zero_grad()
    model.eval()
    g = torch.Generator().manual_seed(1)
    src = [torch.randint(4, 300, (8,), generator=g).tolist() for _ in range(24)]
    tgt, other = [s + [2] for s in src], src[12:] + src[:12]

    def gain(b):
        return (lambda own, oth, _: ev.perplexity(*zip(*oth))[0] / ev.perplexity(*zip(*own))[0])(
            *losses.source_nll(model, src, tgt, other, batch_size=b)
        )

    assert gain(8) > 100, "a model that copies its source loses nearly everything with another one"
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.encoder_attn.v_proj.weight.zero_(), layer.encoder_attn.v_proj.bias.zero_()
    assert gain(1) == 1.0


def test_topk_exact_and_abstracted_hand_fixture():
    refs = [
        T0,
        "@Test public void t() { assertNull(x); }",
        "@Test void a() { b(); }",
        "@Test void a() { b(); }",
        # abstracts to nothing: an empty beam must not match it
        "// one line that is all comment",
    ]
    renamed = T0.replace("testFoo", "testFoo2").replace(" f", " g")  # same structure, other names
    preds = [
        [
            "@Test public void testBar() { int x = 2; }",
            renamed,
            T0.replace(" ", "  ").replace("(", " ( "),
        ],
        ["@Test public void t() {assertNull( x );}"],  # whitespace only: exact at 1
        ["int x;", "@Test void a() { b() }"],  # nothing (the second lacks a semicolon)
        ["x", "x", "x", "x", "@Test void c() { d(); } // other names"],  # abstracted at 5
        ["", "/* nothing */", " "],
    ]  # no match: empty beams
    got = ev.topk_matches(preds, refs, k=5)
    # hits among 5 examples, top-1 ... top-5
    want = {"exact": [1, 1, 2, 2, 2], "abstracted": [1, 2, 2, 2, 3]}
    assert got == {f"{kind}@{j + 1}": n / 5 for kind, ns in want.items() for j, n in enumerate(ns)}
    # why each side alone: in pair mode testFoo2/testFoo and g/f
    a, b, _ = abstract_java.abstract_pair(renamed, T0)
    # get distinct shared ids (METHOD_1/METHOD_4, VAR_1/VAR_2), so a renamed test would never match
    assert a != b


def test_style_cosine_is_sklearn_tfidf_cosine():
    gen = [T0, T1, "@Test public void t() { Bar b = new Bar(); b.go(); }", "int x;"]
    refs = [
        T0.replace("size", "length"),
        T1,
        "@Test public void testGo() { Foo f = make(); f.go(); }",
        "{ }",
    ]

    def docs(codes):
        return [" ".join(abstract_java.identifiers(c)) for c in codes]

    vec = TfidfVectorizer(token_pattern=r"\S+", lowercase=False).fit(docs(refs) + docs(gen))
    want = cosine_similarity(vec.transform(docs(gen)), vec.transform(docs(refs))).diagonal()
    got = ev.style_cosines(gen, refs)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert (
        got[1] == pytest.approx(1.0) and got[3] == 0.0 and ev.style_cosines(["1;"], ["2;"]) == [0.0]
    )


def test_kruskal_table_is_scipy():
    groups = {
        "base": [16.1, 14.2, 18.5, 10.2],
        "custom": [38.4, 32.9, 30.7, 31.8],
        "lldb": [37.8, 31.9, 29.4, 32.2],
        "flat": [1.0, 1.0],
        "flat2": [1.0],
    }
    t = ev.kruskal_table(groups)
    for a in ("base", "custom", "lldb"):
        for b in ("base", "custom", "lldb"):
            assert (
                t[a][b] is None
                if a == b
                else t[a][b] == pytest.approx(kruskal(groups[a], groups[b]).pvalue)
            )
    assert math.isnan(t["flat"]["flat2"])  # scipy itself refuses: all values identical
    # one project a side: scipy's p is a constant
    one = ev.kruskal_table({"a": [5.7], "b": [9.3], "c": [1e6]})
    assert (
        kruskal([5.7], [9.3]).pvalue
        == pytest.approx(kruskal([5.7], [1e6]).pvalue)
        == pytest.approx(0.3173, abs=1e-4)
    )
    assert all(math.isnan(one[a][b]) for a in one for b in one if a != b)
    assert t["base"]["flat"] == pytest.approx(kruskal(groups["base"], groups["flat"]).pvalue)


def test_syntax_valid_hand_fixture():
    codes = [
        T0,
        T1,
        "@Test public void t() { int a = 1 }",
        "@Test public void t() { foo(; }",
        "",
        "   ",
    ]
    assert ev.syntax_valid(codes) == pytest.approx(2 / 6)


# --- bad input: clear errors naming the file, the line, the id or the missing piece
# ------------------------------


def test_non_utf8_and_broken_json_name_the_line(tmp_path):
    f = tmp_path / "predictions.jsonl"
    f.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: not a UTF-8 JSON line"):
        data.read_jsonl(f)
    f.write_bytes(b'{"id": "a"}\n\n{"id": \n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:3: not a UTF-8 JSON line"):
        data.read_jsonl(f)


def test_predictions_missing_ids_or_empty_are_named():
    def row(i, p):
        return {
            "id": i,
            "reference": "x",
            **{m: dict(predictions=p, nll=1.0, tokens=3) for m in ev.MODELS},
        }

    runs.check_predictions([row("a", ["x"]), row("b", ["y", "z"])], "P", ["a", "b"])
    with pytest.raises(
        ValueError, match=r"P: predictions missing for 2 test ids, e.g. \['c', 'd'\]"
    ):
        runs.check_predictions([row("a", ["x"])], "P", ["a", "c", "d"])
    with pytest.raises(ValueError, match=r"P: id b: empty predictions .* base model"):
        runs.check_predictions([row("a", ["x"]), row("b", [])], "P")
    with pytest.raises(ValueError, match=r"P: row \? lacks id"):
        runs.check_predictions([], "P")


def test_run_without_checkpoint_and_unknown_method(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no best.safetensors \(no checkpoint"):
        ev.score_run(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no config.json \(not a run folder\)"):
        ev.score_run(tmp_path / "nowhere")
    (tmp_path / "best.safetensors").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"config.json lacks tokenizer, focal_context, max_src_len, max_tgt_len"
    ):
        ev.score_run(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(dict(tokenizer="t.json", focal_context="fm_fc", max_src_len=8, max_tgt_len=8))
    )
    (tmp_path / "Foo.java").write_text("class Foo { int bar() { return 1; } Foo() {} }")
    with pytest.raises(ValueError, match=r"no method 'baz' .*its methods: Foo, bar"):
        serve.generate_tests(tmp_path, tmp_path / "Foo.java", "baz")


# --- the run-folder contract end to end: tiny random model, lldb delta, 5 test classes
# ---------------------------


def test_score_run_rescore_report_and_generate(tmp_path, capsys, monkeypatch):
    import strategies
    from data.tokenizer import train_tokenizer

    recs = [
        {
            "id": f"p_{i}",
            "project": "p",
            "src_fm_fc": f"Foo{i % 3} {{ int m{i}(int a) {{ return a + {i}; }} }}",
            "tgt": f"@Test public void testM{i}() {{ assertEquals({i}, new Foo{i % 3}().m{i}(0)); }}",
            "test_class": {"file": f"T{i % 6}.java", "identifier": f"T{i % 6}"},
            "focal_class": {"file": f"Foo{i % 3}.java", "identifier": f"Foo{i % 3}"},
        }
        for i in range(24)
    ]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = train_tokenizer(
        [t for r in recs for t in (r["src_fm_fc"], r["tgt"])], vocab_size=300, min_frequency=1
    )
    tok.save(str(tmp_path / "tok.json"))
    torch.manual_seed(0)
    BART(BARTConfig(**{**TINY, "vocab_size": tok.get_vocab_size()})).save_pretrained(
        tmp_path / "base"
    )
    run = tmp_path / "runs" / "lldb-p-0"
    run.mkdir(parents=True)
    cfg = dict(
        base=str(tmp_path / "base"),
        tokenizer=str(tmp_path / "tok.json"),
        project="p",
        fold=0,
        k_folds=4,
        corpus=str(tmp_path / "corpus.jsonl"),
        seed=0,
        strategy="lldb",
        strategy_options={},
        max_src_len=64,
        max_tgt_len=48,
        focal_context="fm_fc",
    )
    (run / "config.json").write_text(json.dumps(cfg))
    model = BART.from_pretrained(tmp_path / "base")
    strategies.apply(model, "lldb")
    with torch.no_grad():
        # the customized model must differ from the base (a shift of fc2.bias would not: LayerNorm
        # removes it)
        model.model.decoder.layers[-1].fc2.weight.normal_(std=1.0)
    runs.save_trainable(model, str(run / "best.safetensors"))
    metrics = ev.score_run(run, limit=4, beams=3, max_new_tokens=6, batch_size=3)
    # 3 beams
    keys = {
        "bleu4",
        "perplexity",
        *(f"{k}@{j}" for k in ("exact", "abstracted") for j in range(1, 4)),
        "style_cosine",
        "syntax_valid",
        "n",
        "perplexity_mean_per_example",
        "source_gain",
        "perplexity_other_source",
        "perplexity_empty_source",
        "unfinished@1",
    }
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved) == {"base", "customized", "decoding"} and set(saved["base"]) == keys == set(
        saved["customized"]
    )
    assert (
        saved["decoding"]["num_beams"] == 3
        and saved["base"]["n"] == 4
        and saved["base"] != saved["customized"]
    )
    # a random model reads its input, faintly: another focal class's source moves its perplexity by
    # ~1e-5 relative, above the ~1e-7 of float32 rounding (a model that ignored it would not move)
    assert abs(math.log(saved["base"]["source_gain"])) > 1e-6
    base_scored = capsys.readouterr().out
    # again: the base comes from the cache
    ev.score_run(run, limit=4, beams=3, max_new_tokens=6, batch_size=3)
    assert "base: scoring" in base_scored and "base: from " in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text()) == saved
    rows = data.read_jsonl(run / "predictions.jsonl")
    assert len(rows) == 4 and all(
        len(r[m]["predictions"]) == 3 == len(r[m]["scores"]) for r in rows for m in ev.MODELS
    )
    # unfinished@1, by hand: the top-1 beams that never wrote </s> in their 6 tokens
    for m in ev.MODELS:
        assert saved[m]["unfinished@1"] == sum(not r[m]["finished"][0] for r in rows) / 4
    hand = [
        {"reference": "a", "base": {**rows[0]["base"], "finished": f}}
        for f in ([True], [False], [False], [True])
    ]
    assert ev.model_metrics(hand, "base", k=1)["unfinished@1"] == 0.5
    # the same numbers from predictions.jsonl
    ev.main([str(run), "--rescore", "--limit", "4", "--beams", "3"])
    assert {m: json.loads((run / "metrics.json").read_text())[m] for m in ev.MODELS} == metrics
    capsys.readouterr()
    # other decoding settings: another key
    ev.score_run(run, limit=4, beams=2, max_new_tokens=6, batch_size=3)
    assert "base: scoring" in capsys.readouterr().out
    log = [
        dict(step=s, pf_s_paper=s / 10, pf_s_exact=s / 8, val_loss=3 - s / 5) for s in range(1, 6)
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in log))
    ev.report(tmp_path / "runs")
    md = (tmp_path / "runs" / "report.md").read_text()
    assert "| paper average | 16.1 | 37.8 |" in md and "Table 4" in md
    assert (tmp_path / "runs" / "fig3.png").stat().st_size > 0 and (
        tmp_path / "runs" / "fig4.png"
    ).stat().st_size > 0
    (tmp_path / "Foo.java").write_text("class Foo { int m3(int a) { return a + 3; } }")
    tests = serve.generate_tests(run, tmp_path / "Foo.java", "m3", k=2, beams=2, max_new_tokens=5)
    assert (
        len(tests) == 2 and all(isinstance(c, str) for _, c in tests) and tests[0][0] >= tests[1][0]
    )
    capsys.readouterr()
    ev.main(
        [
            "generate",
            "--run",
            str(run),
            "--java",
            str(tmp_path / "Foo.java"),
            "--method",
            "m3",
            "--k",
            "2",
            "--beams",
            "2",
            "--max-new-tokens",
            "5",
        ]
    )
    assert "// 1: score " in capsys.readouterr().out
    # a log.jsonl whose last line a kill cut short: scoring and the report drop that line, as a
    # resume does
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 6, "val_lo')
    ev.main([str(run), "--rescore", "--limit", "4", "--beams", "3"])
    ev.report(tmp_path / "runs")
    assert "dropping a partial last line" in capsys.readouterr().out
    # a report that fails while drawing leaves the previous report.md and figures as they were,
    # and no temporary file
    before = {
        f: (tmp_path / "runs" / f).read_bytes() for f in ("report.md", "fig3.png", "fig4.png")
    }

    def broken(*args):
        raise RuntimeError("drawing failed")

    def other_figure3(plt, scores, means, cols, path):
        # a Figure 3 unlike the one on disk, as new runs would draw it
        plt.figure().savefig(path)

    with monkeypatch.context() as m:
        m.setattr(ev, "figure3", other_figure3)
        m.setattr(ev, "figure4", broken)
        with pytest.raises(RuntimeError, match="drawing failed"):
            ev.report(tmp_path / "runs")
    after = {f: (tmp_path / "runs" / f).read_bytes() for f in before}
    assert after == before
    assert not list((tmp_path / "runs").glob(".tmp-*"))
    # execute.py's figures (execution.json) are kept when the run is scored again on the same
    # predictions, shown in the summary, and removed with a message when the predictions change
    summary = {
        "harness_valid": 0.5,
        "valid_pairs": 2,
        "models": {
            name: {
                "compile@1": 0.5,
                "compile@3": 0.5,
                "pass@1": 0.0,
                "pass@3": 0.5,
                "focal_covered@3": 0.5,
            }
            for name in ev.MODELS
        },
    }
    (run / "execution.json").write_text(json.dumps({"summary": summary}))
    capsys.readouterr()
    ev.main([str(run), "--rescore", "--limit", "4", "--beams", "3"])
    printed = capsys.readouterr().out
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["customized"]["pass@3"] == 0.5 and saved["base"]["harness_valid"] == 0.5
    assert "| pass@3 | focal_covered@3 |" in printed and "(harness_valid 50.0%)" in printed
    # the same decoding gives the same predictions: the figures stay
    ev.score_run(run, limit=4, beams=2, max_new_tokens=6, batch_size=3)
    assert (run / "execution.json").exists()
    # other decoding, other predictions: the figures go
    ev.score_run(run, limit=4, beams=3, max_new_tokens=6, batch_size=3)
    assert "execution.json removed" in capsys.readouterr().out
    assert not (run / "execution.json").exists()
    assert "pass@1" not in json.loads((run / "metrics.json").read_text())["base"]
    # a base that is not the one the run was trained on (config.json's base_checksum) is refused by
    # name
    (run / "config.json").write_text(json.dumps({**cfg, "base_checksum": "0" * 64}))
    with pytest.raises(SystemExit, match=r"is not the base .* was trained on"):
        ev.score_run(run, limit=4, beams=3, max_new_tokens=6, batch_size=3)


def test_a_beam_that_ends_only_at_the_training_length_limit_is_unfinished(monkeypatch):
    """score_model's `finished`: </s> before index max_tgt_len - 1 (seq[0] is the start token).
    A </s> at that index is where a cut training target ended (a base trained on targets cut with
    </s> writes one there after looping), not a closed test; no </s> at all ran to the limit."""
    seqs = [[2, 5, 6, 2, 1], [2, 5, 6, 7, 2], [2, 5, 6, 7, 8]]
    monkeypatch.setattr(ev, "source_nll", lambda *a: ([(1.0, 3)], [(2.0, 3)], [(3.0, 3)]))
    monkeypatch.setattr(ev, "beam_search", lambda *a: [(seqs, [-0.1, -0.2, -0.3])])

    class Tok:
        def decode_batch(self, ids):
            return [" ".join(map(str, s)) for s in ids]

    out = ev.score_model(None, Tok(), [[0, 9, 2]], [[5, 2]], [0], 3, 3, 8, 5, 1, "cpu")
    assert out[0]["finished"] == [True, False, False]
