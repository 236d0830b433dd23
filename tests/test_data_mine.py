"""Tests of data/mine.py and data/java.py: methods2test's mining rules on hand-written Java (§3.1
Dataset).

.venv/bin/python -m pytest tests/test_data_mine.py -q

The reference is ../docs/methods2test.md: every expected value below was worked out by hand from
its rules for the fixtures in tests/fixtures/java/rules/ (one file per rule or deviation), and
the commons-io test compares with the spec's worked record field for field (it skips when
data/cache/ lacks the package: `python -m data.fetch commons-io`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abstract_java import java_tokens
from data.java import PARSER, collapse, invocations, parse_java
from data.mine import MiningError, focal_name, mine, path_key

FIX = Path(__file__).parent / "fixtures" / "java"
ROOT = Path(__file__).resolve().parent.parent


def run_mine(root, **kw):
    warnings = []
    records, counts = mine(root, "rules", warn=lambda msg, **_: warnings.append(msg), **kw)
    return (
        {(r["test_class"]["identifier"], r["test_case"]["identifier"]): r for r in records},
        counts,
        warnings,
    )


@pytest.fixture(scope="module")
def rules():
    return run_mine(FIX / "rules")


def test_counts(rules):
    _, counts, _ = rules
    # 14 .java files; 7 contain @Test; BrokenTest does not parse -> 6 test classes. Path rule
    # (leading /): Calc, Greeter, Latin, lib/Mod; name fallback: StackTests -> Stack,
    # AttestationTest -> Attestation. Test cases: CalcTest 5 (not @ParameterizedTest, not @Nested),
    # Stack, Attestation, Greeter, Latin 1 each, Mod 2. Mapped: all but CalcTest.mixed; only
    # multipliesTwoNumbers by unique call; ModTest's two identical tests -> 1.
    assert counts == dict(
        files=14,
        test_files=7,
        test_classes=6,
        mapped_classes=6,
        by_path=4,
        by_name=2,
        test_cases=11,
        name_match=9,
        unique_call=1,
        pairs=9,
        duplicates=1,
        unparsed=1,
        unreadable=0,
    )


def test_name_match_takes_first_overload(rules):
    r = rules[0][("CalcTest", "testAdd")]
    # not the double overload declared later
    assert r["focal_method"]["signature"] == "int add(int a, int b)"
    # JUnit 5: package-private @Test counts
    assert r["test_case"]["full_signature"] == "@Test void testAdd()"
    assert r["test_case"]["invocations"] == ["assertEquals", "add"]


def test_test_named_after_class_maps_to_first_constructor(rules):
    fm = rules[0][("CalcTest", "testCalc")]["focal_method"]
    assert (fm["identifier"], fm["parameters"], fm["constructor"]) == ("Calc", "()", True)
    assert (fm["signature"], fm["full_signature"], fm["return"]) == (
        " Calc()",
        "public  Calc()",
        "",
    )
    # methods2test never collects a constructor's calls (../docs/methods2test.md §4)
    assert fm["invocations"] == []


def test_unique_call_and_name_normalisation(rules):
    recs = rules[0]
    assert recs[("CalcTest", "multipliesTwoNumbers")]["focal_method"]["identifier"] == "mul"
    assert ("CalcTest", "mixed") not in recs  # calls both add and mul: no unique candidate
    # every "test" deleted
    assert recs[("CalcTest", "testGetTestName")]["focal_method"]["identifier"] == "getName"


def test_parameterized_nested_and_inner_classes_ignored(rules):
    recs = rules[0]
    assert {k[1] for k in recs if k[0] == "CalcTest"} == {
        "testAdd",
        "testCalc",
        "multipliesTwoNumbers",
        "testGetTestName",
    }
    fc = recs[("CalcTest", "testAdd")]["focal_class"]
    # no Inner.twice
    assert [m["identifier"] for m in fc["methods"]] == [
        "Calc",
        "Calc",
        "add",
        "add",
        "mul",
        "getName",
    ]
    assert fc["interfaces"] == "implements Cloneable" and fc["superclass"] == ""
    assert [f["var_name"] for f in fc["fields"]] == ["ZERO", "memory"]


def test_corpus_strings_by_hand(rules):
    r = rules[0][("CalcTest", "testAdd")]
    fm = "public int add(int a, int b) { return a + b; }"
    co = "public Calc(); public Calc(int memory);"
    # mul: not public
    ms = "public int add(int a, int b); public double add(double a, double b); public String getName();"
    assert r["src_fm"] == fm
    assert r["src_fm_fc"] == f"Calc {{ {fm} }}"
    assert r["src_fm_fc_co"] == f"Calc {{ {fm} {co} }}"
    assert r["src_fm_fc_ms"] == f"Calc {{ {fm} {co} {ms} }}"
    assert (
        r["src_fm_fc_ms_ff"]
        == r["src"]
        == f"Calc {{ {fm} {co} {ms} public static final int ZERO = 0; }}"
    )
    assert r["tgt"] == "@Test void testAdd() { assertEquals(3, calc.add(1, 2)); }"
    assert r["id"].startswith("rules_") and r["project"] == "rules"


def test_record_layout(rules):
    r = rules[0][("StackTests", "testPush")]
    assert r["test_class"] == {
        "identifier": "StackTests",
        "superclass": "",
        "interfaces": "",
        "fields": [],
        "file": "src/test/java/demo/StackTests.java",
    }
    assert r["focal_class"]["file"] == "src/main/java/demo/Stack.java"
    assert set(r["focal_class"]["methods"][0]) == {
        "identifier",
        "parameters",
        "modifiers",
        "return",
        "signature",
        "full_signature",
        "class_method_signature",
        "testcase",
        "constructor",
    }
    assert r["focal_method"]["body"] == "public void push(int x) {\n        size++;\n    }"
    assert r["focal_class"]["fields"] == [
        {
            "original_string": "private int size;",
            "modifier": "private",
            "type": "int",
            "declarator": "size",
            "var_name": "size",
        }
    ]
    assert r["repository"]["repo_id"] == "rules"


def test_byte_slicing_after_non_ascii(rules):
    recs = rules[0]
    # UTF-8 multi-byte characters earlier in the file (line 4) must not shift the span of greet()
    assert recs[("GreeterTest", "testGreet")]["focal_method"]["body"] == (
        'public String greet(String name) {\n        return "Hallo " + name;\n    }'
    )
    assert recs[("GreeterTest", "testGreet")]["tgt"].endswith(
        'assertEquals("Hallo Jörg", new Greeter().greet("Jörg")); }'
    )
    # Latin-1 file (0xE9 is not UTF-8): decoded, not skipped
    assert (
        recs[("LatinTest", "testName")]["focal_method"]["body"]
        == 'public String name() { return "André"; }'
    )


def test_file_that_does_not_parse_is_skipped_and_named(rules):
    recs, _, warnings = rules
    assert not any(k[0] == "BrokenTest" for k in recs)
    assert any("BrokenTest.java" in w and "syntax errors" in w for w in warnings)


def test_path_rules_and_strict_mode():
    # never a candidate
    assert path_key("src/test/java/p/FooTest.java", anchored=False) == "src//java/p/foo.java"
    assert path_key("src/test/java/p/FooTest.java", anchored=True) == "/src/main/java/p/foo.java"
    assert (
        path_key("a/src/test/java/p/TestFoo.java", anchored=False) == "a/src/main/java/p/foo.java"
    )
    assert path_key("src/test/java/p/FooTests.java", anchored=True) == "/src/main/java/p/foos.java"
    assert [
        focal_name(s)
        for s in [
            "FooTests",
            "FooTestCase",
            "FooTestCases",
            "FooIT",
            "TestFoo",
            "FooTest",
            "Test",
            "Helper",
        ]
    ] == ["Foo"] * 6 + [None, None]
    recs, counts, _ = run_mine(FIX / "rules", strict=True)
    # released rule: only the module layout lib/src/test -> lib/src/main maps; Attestation is
    # unreachable
    assert set(recs) == {("ModTest", "testOne")} and (counts["by_path"], counts["by_name"]) == (
        1,
        0,
    )


def test_invocations_preorder_with_duplicates():
    classes, err = parse_java(
        b"class A { void f() { a.b().c(d()); x(); Runnable r = () -> x(); new B(); } }"
    )
    assert not err
    # outer call first; `new` is no call
    assert invocations(classes[0]["methods"][0]) == ["c", "b", "d", "x", "x"]


def test_collapse_turns_line_comments_into_block_comments():
    """The one-line form keeps the code after a `//` comment: java_tokens (src2abs's lexer, which
    drops comments) of the one-line string equal those of the original lines, and tree-sitter
    parses it without an error."""
    code = (
        '@Test void f() {\n  int a = 1; // set "a"\n  String s = "http://x"; /* b // c */\n'
        "  char q = '/'; g(a); // don't */ stop\n  assertEquals(1, a);\n}"
    )
    one = collapse(code)
    assert one == (
        '@Test void f() { int a = 1; /* set "a" */ String s = "http://x"; /* b // c */ '
        "char q = '/'; g(a); /* don't * / stop */ assertEquals(1, a); }"
    )
    assert java_tokens(one) == java_tokens(code)
    assert java_tokens(one)[-8:] == ["assertEquals", "(", "1", ",", "a", ")", ";", "}"]
    assert not PARSER.parse(f"class _ {{ {one} }}".encode()).root_node.has_error
    # already one line: the comment stays a comment
    assert collapse("a(); // b(); }") == "a(); /* b(); } */"


def test_bad_input(tmp_path):
    with pytest.raises(MiningError, match="nowhere"):
        mine(tmp_path / "nowhere", "p")
    (tmp_path / "README.txt").write_text("no java here")
    with pytest.raises(MiningError, match="no readable .java"):
        mine(tmp_path, "p")
    (tmp_path / "Foo.java").write_text("class Foo { void f() {} }")
    with pytest.raises(MiningError, match="none contains @Test"):
        mine(tmp_path, "p")
    # binary junk named .java (containing the bytes @Test) and a dangling link: named in warnings,
    # mining goes on
    (tmp_path / "Junk.java").write_bytes(b"\x00\xff@Test\x89PNG\x1a" + bytes(range(256)))
    os.symlink(tmp_path / "gone", tmp_path / "Dangling.java")
    (tmp_path / "FooTest.java").write_text(
        "class FooTest { @Test void testF() { new Foo().f(); } }"
    )
    warnings = []
    records, counts = mine(tmp_path, "p", warn=lambda msg, **_: warnings.append(msg))
    # test next to source: path rule
    assert [r["focal_method"]["identifier"] for r in records] == ["f"]
    assert (counts["unparsed"], counts["unreadable"]) == (1, 1)
    assert any("Junk.java" in w for w in warnings) and any("Dangling.java" in w for w in warnings)


def test_cli_error_writes_nothing(tmp_path):
    out = tmp_path / "x.jsonl"
    p = subprocess.run(
        [sys.executable, "-m", "data.mine", str(tmp_path / "missing"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and "missing: no such folder" in p.stderr and not out.exists()


COMMONS_IO = ROOT / "data" / "cache" / "src" / "commons-io"


@pytest.mark.skipif(
    not COMMONS_IO.is_dir(), reason="commons-io not fetched: python -m data.fetch commons-io"
)
def test_commons_io_worked_record():
    want = json.loads((FIX / "commons_io_SizeFileComparatorTest.json").read_text())
    records, _ = mine(COMMONS_IO, "commons-io")
    got = [
        r
        for r in records
        if r["test_case"]["class_method_signature"]
        == "SizeFileComparatorTest.testNonexistantFile()"
    ]
    assert len(got) == 1
    for key in ["test_class", "test_case", "focal_class", "focal_method"]:
        assert got[0][key] == want[key], key
    for key, value in want["corpus"].items():
        assert got[0]["tgt" if key == "target" else key] == value, key
