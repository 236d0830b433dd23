"""Tests of the corpus side of data/: folds, tokenizer, methods2test reader, fetching, project list
(§3.1 Dataset).

.venv/bin/python -m pytest tests/test_data_corpus.py -q

References: BART/RoBERTa's special ids (<s>=0, <pad>=1, </s>=2, <unk>=3), the methods2test
layouts of ../docs/methods2test.md §6-§7, its §10 recipe for Debian sources, and the pinned
project list (38 Debian bookworm source packages in data/projects.tsv, 4-6 targets, no sibling of
a target in the base). Nothing here touches the network: the Debian fetch is exercised on a
hand-made source package (an .orig tarball and its .dsc)."""

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

import data
from data import DEFAULT_BASE, DEFAULT_TARGET, TARGETS, folds, load_project, read_projects
from data.fetch import deb_src, fetch, project_row
from data.methods2test import read_methods2test
from data.mine import mine
from data.tokenizer import encode_pairs, load_tokenizer, train_tokenizer

FIX = Path(__file__).parent / "fixtures" / "java"


def synthetic(n_classes=12):
    return [
        {
            "project": "p",
            "id": f"p_{i}_{j}",
            "test_class": {"file": f"src/test/C{i}Test.java", "identifier": f"C{i}Test"},
        }
        # 30 records, classes of 1..4 tests
        for i in range(n_classes)
        for j in range(i % 4 + 1)
    ]


def classes(rs):
    return {r["test_class"]["identifier"] for r in rs}


def test_folds_golden_and_invariants():
    recs = synthetic()
    # golden values: a salted hash() or a platform-dependent order would change them between runs
    assert sorted(classes(folds(recs, 0)[2])) == ["C0Test", "C4Test", "C7Test", "C8Test"]
    assert folds(recs, 0, seed=1)[2][0]["id"] == "p_4_0"
    tests = []
    for f in range(4):
        train, val, test = folds(recs, f)
        # balanced within one class
        assert len(train) + len(val) + len(test) == 30 and 7 <= len(test) <= 8
        assert not (classes(train) & classes(test)) and not (
            classes(val) & (classes(train) | classes(test))
        )
        assert 1 <= len(val) <= 3  # ~10% of the 22-23 training records, whole classes
        tests += [r["id"] for r in test]
    # every record is tested exactly once over the 4 folds
    assert sorted(tests) == sorted(r["id"] for r in recs)
    assert folds(recs, 2, seed=7) == folds(list(recs), 2, seed=7)


def test_folds_errors():
    with pytest.raises(ValueError, match="fold must be in 0..3"):
        folds(synthetic(), 4)
    with pytest.raises(ValueError, match="3 test classes"):
        folds(synthetic(3), 0)


@pytest.fixture(scope="module")
def rules_records():
    return mine(FIX / "rules", "rules", warn=lambda *a, **k: None)[0]


@pytest.fixture(scope="module")
def tok(rules_records):
    texts = [t for r in rules_records for t in (r["src"], r["tgt"])] * 3
    return train_tokenizer(texts, vocab_size=400, min_frequency=2)


def test_tokenizer_specials_wrapping_and_roundtrip(tok):
    assert [tok.token_to_id(t) for t in ["<s>", "<pad>", "</s>", "<unk>"]] == [0, 1, 2, 3]
    assert 260 < tok.get_vocab_size() <= 400  # 4 specials + 256 bytes + merges
    text = 'assertEquals("Hallo Jörg €", new Greeter().greet("Jörg"));'
    ids = tok.encode(text).ids
    assert ids[0] == 0 and ids[-1] == 2 and 0 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.decode(ids) == text  # byte-level BPE is lossless
    # merges learned
    assert len(tok.encode("public int add(int a, int b)").ids) < len("public int add(int a, int b)")


def test_encode_pairs_truncation(tok, rules_records):
    src, tgt, n = encode_pairs(tok, rules_records, max_src=10**6, max_tgt=10**6)
    assert n == 0 and len(src) == len(rules_records)
    limit = sorted(len(s) for s in src)[4]  # 4 sources are shorter than this, the others get cut
    cut_src, cut_tgt, n = encode_pairs(tok, rules_records, max_src=limit, max_tgt=10**6)
    assert n == sum(len(s) > limit for s in src) and n >= 1
    assert all(len(s) <= limit and s[-1] == 2 for s in cut_src) and cut_tgt == tgt
    assert [s[: limit - 1] for s in src if len(s) > limit] == [
        s[:-1] for s, o in zip(cut_src, src) if len(o) > limit
    ]
    # a cut target is its first max_tgt ids with no </s>: a test cut at the limit has not ended
    # (a </s> there teaches the decoder to stop at that position); an uncut one keeps its </s>
    limit = sorted(len(t) for t in tgt)[4]
    _, cut_tgt, n = encode_pairs(tok, rules_records, max_src=10**6, max_tgt=limit)
    assert n == sum(len(t) > limit for t in tgt) and n >= 1
    assert cut_tgt == [t[:limit] for t in tgt]
    assert [t[-1] == 2 for t in cut_tgt] == [len(t) <= limit for t in tgt]


def test_load_tokenizer_json_and_bart_files(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    tok.model.save(str(tmp_path))  # vocab.json + merges.txt, the layout of BART/RoBERTa checkpoints
    text = "@Test public void testPush() { new Stack().push(1); }"
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(text).ids == tok.encode(text).ids
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    (tmp_path / "tokenizer.json").unlink()
    assert load_tokenizer(tmp_path).encode(text).ids == tok.encode(text).ids
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing")


def test_methods2test_reader(rules_records, tmp_path):
    keys = ["focal_class", "focal_method", "test_class", "test_case"]
    # the published dataset layout: <repo_id>/<repo_id>_<n>.json
    for i, r in enumerate(rules_records[:3]):
        d = {k: r[k] for k in keys} | {
            "repository": {"repo_id": 1001, "url": "https://example.org/r"}
        }
        (tmp_path / "ds" / "1001").mkdir(parents=True, exist_ok=True)
        (tmp_path / "ds" / "1001" / f"1001_{i}.json").write_text(json.dumps(d))
        corpus = {"target": r["tgt"]} | {k: r[k] for k in r if k.startswith("src_")}
        (tmp_path / "co" / "test" / "1001").mkdir(parents=True, exist_ok=True)
        (tmp_path / "co" / "test" / "1001" / f"1001_{i}_corpus.json").write_text(json.dumps(corpus))
    (tmp_path / "ds" / "1001" / "1001_9.json").write_text(
        (tmp_path / "ds" / "1001" / "1001_0.json").read_text()
    )
    with tarfile.open(tmp_path / "ds.tar.bz2", "w:bz2") as tf:
        tf.add(tmp_path / "ds", arcname="dataset")
    for path in [tmp_path / "ds", tmp_path / "ds.tar.bz2", tmp_path / "co"]:
        got = read_methods2test(path)
        # 1001_9 is a duplicate of 1001_0
        assert [g["id"] for g in got] == ["1001_0", "1001_1", "1001_2"]
        assert all(g["project"] == "1001" for g in got)
        for g, r in zip(got, rules_records):
            assert {k: g[k] for k in g if k.startswith("src") or k == "tgt"} == {
                k: r[k] for k in r if k.startswith("src") or k == "tgt"
            }
    with pytest.raises(ValueError, match="no methods2test records of repository 7"):
        read_methods2test(tmp_path / "co", repo=7)


def test_deb_src_derivation():
    deb822 = (
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://other.invalid/thing\nSuites: x\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nEnabled: no\n"
    )
    assert deb_src(deb822, deb822=True) == [
        "Types: deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main"
    ]
    one_line = "# deb http://x/debian a main\ndeb [signed-by=/k.gpg] http://mirror.invalid/debian bookworm main\n"
    assert deb_src(one_line, deb822=False) == [
        "deb-src [signed-by=/k.gpg] http://mirror.invalid/debian bookworm main"
    ]


def fake_package(cache, checksum=None):
    dl = cache / "download" / "fake"
    dl.mkdir(parents=True)
    (cache / "A.java").write_text("class A {}")
    with tarfile.open(dl / "fake_1.0.orig.tar.gz", "w:gz") as tf:
        tf.add(cache / "A.java", arcname="fake-1.0/src/A.java")
    sha = checksum or hashlib.sha256((dl / "fake_1.0.orig.tar.gz").read_bytes()).hexdigest()
    (dl / "fake_1.0-1.dsc").write_text(
        f"Source: fake\nChecksums-Sha256:\n {sha} 1 fake_1.0.orig.tar.gz\nFiles:\n x\n"
    )
    return {
        "name": "fake",
        "debian_source": "fake",
        "version": "1.0-1",
        "git_url": "",
        "git_tag": "",
        "role": "base",
    }


def test_fetch_verifies_unpacks_and_is_idempotent(tmp_path):
    row = fake_package(tmp_path)
    dest = fetch(row, cache=tmp_path)
    # top folder dropped
    assert (
        dest == tmp_path / "src" / "fake" and (dest / "src" / "A.java").read_text() == "class A {}"
    )
    assert (tmp_path / "src" / "fake.stamp").read_text() == "fake=1.0-1\n"
    (dest / "marker").write_text("kept")
    assert (fetch(row, cache=tmp_path) / "marker").exists()  # stamped: not unpacked again


def test_fetch_rejects_bad_checksum(tmp_path):
    row = fake_package(tmp_path, checksum="0" * 64)
    with pytest.raises(SystemExit, match="Checksums-Sha256"):
        fetch(row, cache=tmp_path)
    # removed: refetched next run
    assert not (tmp_path / "download" / "fake" / "fake_1.0.orig.tar.gz").exists()
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == []  # nothing half-written


def test_project_list():
    rows = read_projects()
    assert len(rows) == 38 and len({r["name"] for r in rows}) == 38
    assert {r["debian_source"]: r["version"] for r in rows}["netty"] == "1:4.1.48-7+deb12u2"
    assert project_row("libcommons-lang3-java")["version"] == "3.12.0-2+deb12u1"
    assert (
        4 <= len(TARGETS) <= 6
        and DEFAULT_TARGET in TARGETS
        and not set(DEFAULT_BASE) & set(TARGETS)
    )
    base = {r["name"] for r in rows if r["role"] == "base"}
    for family in [{"commons-math", "commons-math3"}, {"httpclient", "httpclient5"}]:
        # a target's sibling is never in the base
        assert not (family & set(TARGETS)) or not (family & base)
    with pytest.raises(SystemExit, match="unknown project 'nope'"):
        project_row("nope")


def test_load_project(tmp_path, monkeypatch, rules_records):
    with pytest.raises(KeyError, match="unknown project 'nope'"):
        load_project("nope")
    monkeypatch.setattr(data, "CACHE", tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m data.fetch commons-csv"):
        load_project("commons-csv")
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rules_records))
    assert load_project(tmp_path / "r.jsonl") == rules_records
