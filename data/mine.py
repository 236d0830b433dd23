"""Mine focal-method <-> test-case pairs from a Java source tree, methods2test's way (§3.1
Dataset).

python -m data.mine DIR --project NAME --out FILE.jsonl [--strict]

Rules: ../docs/methods2test.md §2-§7; our deviations (§9), all on by default, `--strict` turns 1
and 2 off:
  1. paths get a leading "/" before the path rule, so a root-level Maven layout (src/test ->
     src/main) maps;
  2. FooTests / FooTestCase(s) / FooIT name Foo too, and when no path matches, the test class falls
     back to a non-test Foo.java by file name (same folder under src/main, else same package, else
     the only one);
  3. byte slicing with a UTF-8/Latin-1 decode (data/java.py);
  4. test names are normalised by deleting every "test" (methods2test's code, not its README).
One record per mapped test case (../docs/design.md "Record"): id, project, src (= src_fm_fc_ms_ff),
tgt, the five src_* strings, and methods2test's focal_class / focal_method / test_class / test_case
/ repository. Identical (src, tgt) pairs within the project are kept once.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from data import atomic_write, output_file
from data.java import collapse, invocations, parse_java


class MiningError(ValueError):
    """Input that cannot be mined at all (missing folder, no Java, no tests): the message names
    it."""


def read_tree(root):
    """{relative path: bytes} of every .java file under root (sorted), plus a list of files that
    failed to read."""
    root = Path(root)
    if not root.is_dir():
        raise MiningError(f"{root}: no such folder")
    files, unreadable = {}, []
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        for n in sorted(names):
            if n.endswith(".java"):
                p = Path(dirpath) / n
                try:
                    files[p.relative_to(root).as_posix()] = p.read_bytes()
                except OSError as e:  # broken link, permission, a fifo: name it and go on
                    unreadable.append(f"{p}: {e.strerror or e}")
    if not files:
        raise MiningError(
            f"{root}: no readable .java files"
            + (f" ({len(unreadable)} unreadable)" if unreadable else "")
        )
    return files, unreadable


def path_key(path, anchored):
    """methods2test's path rule: lower-case, /src/test/ -> /src/main/, delete every 'test'."""
    p = ("/" + path) if anchored else path
    return p.lower().replace("/src/test/", "/src/main/").replace("test", "")


def focal_name(stem):
    """Class name a test file is named after: FooTest(s), FooTestCase(s), FooIT, TestFoo -> Foo
    (else None)."""
    for suffix in ("Tests", "TestCases", "TestCase", "Test", "IT"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem[4:] if stem.startswith("Test") and len(stem) > 4 else None


def find_focal_file(test_path, test_bytes, by_key, by_name, strict):
    """(focal path, rule) for one test file, or (None, None). by_key: path-rule keys; by_name:
    file name -> paths."""
    hit = by_key.get(path_key(test_path, anchored=not strict))
    if hit or strict:
        return hit, "path" if hit else None
    folder, stem = test_path.rsplit("/", 1) if "/" in test_path else ("", test_path)
    name = focal_name(stem[:-5])
    same = by_name.get(f"{name}.java", [])
    if len(same) == 1:
        return same[0], "name"
    main_folder = ("/" + folder + "/").replace("/src/test/", "/src/main/")[1:]
    for p in same:  # the same folder, under src/main for src/test
        if p == f"{main_folder}{name}.java":
            return p, "name"
    pkg = re.search(rb"^\s*package\s+([\w.]+)\s*;", test_bytes, re.M)
    if pkg:  # several files of that name: the one in the test's own package, if unique
        in_pkg = [
            p
            for p in same
            if p.endswith("/" + pkg.group(1).decode().replace(".", "/") + f"/{name}.java")
        ]
        if len(in_pkg) == 1:
            return in_pkg[0], "name"
    return None, None


def find_focal_method(test, focal_classes):
    """(focal class, focal method, rule) for one test case (../docs/methods2test.md §5), or
    None."""
    first = {}  # lower-cased name -> first declared (class, method); overloads: the first wins
    for c in focal_classes:
        for m in c["methods"]:
            if not m["testcase"]:
                first.setdefault(m["identifier"].lower(), (c, m))
    # testFoo in FooTest -> "foo" -> the constructor
    name = test["identifier"].lower().replace("test", "")
    if name in first:
        return (*first[name], "name_match")
    called = {n.lower() for n in invocations(test)} & first.keys()
    if len(called) == 1:
        return (*first[called.pop()], "unique_call")
    return None


def corpus_strings(fc, fm):
    """The five focal-context levels (../docs/methods2test.md §7): one-line pseudo-class `Name {
    FM [CO] [MS] [FF] }`."""
    fm_s = collapse(fm["body"])
    co = [collapse(m["full_signature"]) + ";" for m in fc["methods"] if m["constructor"]]
    ms = [
        collapse(m["full_signature"]) + ";"
        for m in fc["methods"]
        if not m["constructor"] and "public" in m["modifiers"]
    ]
    ff = [collapse(f["original_string"]) for f in fc["fields"] if "public" in f["modifier"]]

    def wrap(*parts):
        return " ".join([fc["identifier"], "{", fm_s, *[p for part in parts for p in part], "}"])

    return {
        "src_fm": fm_s,
        "src_fm_fc": wrap(),
        "src_fm_fc_co": wrap(co),
        "src_fm_fc_ms": wrap(co, ms),
        "src_fm_fc_ms_ff": wrap(co, ms, ff),
    }


def _export(m, full):
    """A method dict as methods2test stores it: with body and invocations (full) or without
    (class listing)."""
    d = {k: v for k, v in m.items() if not k.startswith("_") and (full or k != "body")}
    return {**d, "invocations": invocations(m)} if full else d


def _index_focal_files(focal, strict):
    """(by_key, by_name) for find_focal_file over the non-test files `focal`. by_key: lower-cased
    path, with a leading "/" unless strict -> the first such path; by_name: file name -> paths."""
    by_key, by_name = {}, {}
    for p in focal:
        # candidates are only lower-cased: a focal path that contains "test" (Attestation.java) is
        # unreachable first match wins, as the released script
        by_key.setdefault(("/" + p if not strict else p).lower(), p)
        by_name.setdefault(p.rsplit("/", 1)[-1], []).append(p)
    return by_key, by_name


def mine(root, project, url=None, strict=False, warn=print):
    """All records of one Java tree, and the counts of the run. Raises MiningError on unusable
    input."""
    files, unreadable = read_tree(root)
    tests = [p for p, b in files.items() if b"@Test" in b]
    if not tests:
        raise MiningError(
            f"{root}: {len(files)} .java files but none contains @Test (no JUnit/TestNG tests)"
        )
    test_set = set(tests)
    focal = [p for p in files if p not in test_set and "src/test" not in p]
    by_key, by_name = _index_focal_files(focal, strict)
    counts = dict(
        files=len(files),
        test_files=len(tests),
        test_classes=0,
        mapped_classes=0,
        by_path=0,
        by_name=0,
        test_cases=0,
        name_match=0,
        unique_call=0,
        pairs=0,
        duplicates=0,
        unparsed=0,
        unreadable=len(unreadable),
    )
    repository = {"repo_id": project, "url": url or f"file:{Path(root).resolve()}"}
    parsed, unparsed, records, seen = {}, list(unreadable), [], set()

    # parse each file once; a tree with syntax errors is skipped (its spans are unreliable)
    def parse(path):
        if path not in parsed:
            classes, err = parse_java(files[path])
            parsed[path] = None if err else classes
            if err:
                unparsed.append(path)
        return parsed[path]

    for tp in tests:
        test_classes = parse(tp)
        if test_classes is None:
            continue
        counts["test_classes"] += len(test_classes)
        counts["test_cases"] += sum(m["testcase"] for c in test_classes for m in c["methods"])
        fp, rule = find_focal_file(tp, files[tp], by_key, by_name, strict)
        focal_classes = parse(fp) if fp else None
        if not focal_classes:
            continue
        counts["mapped_classes"] += len(test_classes)
        counts["by_" + rule] += len(test_classes)
        for tc in test_classes:
            for test in (m for m in tc["methods"] if m["testcase"]):
                hit = find_focal_method(test, focal_classes)
                if hit is None:
                    continue
                fc, fm, how = hit
                counts[how] += 1
                strings = corpus_strings(fc, fm)
                tgt = collapse(test["body"])
                if (strings["src_fm_fc_ms_ff"], tgt) in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add((strings["src_fm_fc_ms_ff"], tgt))
                records.append(
                    {
                        "id": f"{project}_{len(records)}",
                        "project": project,
                        "src": strings["src_fm_fc_ms_ff"],
                        "tgt": tgt,
                        **strings,
                        "test_class": {
                            **{k: v for k, v in tc.items() if k != "methods"},
                            "file": tp,
                        },
                        "test_case": _export(test, full=True),
                        "focal_class": {
                            **{k: v for k, v in fc.items() if k != "methods"},
                            "methods": [_export(m, full=False) for m in fc["methods"]],
                            "file": fp,
                        },
                        "focal_method": _export(fm, full=True),
                        "repository": repository,
                    }
                )
    counts["pairs"], counts["unparsed"] = len(records), len(unparsed) - len(unreadable)
    for u in unparsed[:10]:
        warn(
            f"warning: {project}: skipped {u}" + ("" if ": " in u else " (syntax errors)"),
            file=sys.stderr,
        )
    if len(unparsed) > 10:
        warn(
            f"warning: {project}: ... and {len(unparsed) - 10} more files skipped", file=sys.stderr
        )
    return records, counts


def mine_to_jsonl(root, project, out, url=None, strict=False):
    """Mine and write one JSON line per record to `out` (temp file + rename: never half-written).
    Counts."""
    records, counts = mine(root, project, url=url, strict=strict)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    atomic_write(out, "".join(lines))
    return counts


def format_counts(c):
    return (
        f"{c['files']} files, {c['test_files']} test files, {c['test_classes']} test classes "
        f"({c['mapped_classes']} mapped: {c['by_path']} path, {c['by_name']} name), "
        f"{c['test_cases']} test cases, "
        f"mapped {c['name_match']} name match + {c['unique_call']} unique call -> "
        f"{c['pairs']} pairs "
        f"({c['duplicates']} duplicates dropped), {c['unparsed']} files did not parse, "
        f"{c['unreadable']} unreadable"
    )


def main():
    ap = argparse.ArgumentParser(
        description="Mine methods2test-style focal-method/test-case pairs from a Java tree."
    )
    ap.add_argument("root", help="a Java source tree (a checkout or an unpacked source package)")
    ap.add_argument(
        "--project", help="project name stored in every record (default: the folder's name)"
    )
    ap.add_argument("--out", required=True, type=output_file, help="output JSONL file")
    ap.add_argument(
        "--url", help="repository.url stored in every record (default: file:<absolute path>)"
    )
    ap.add_argument(
        "--strict",
        action="store_true",
        help="the released script's path rule: no leading /, no name fallback",
    )
    args = ap.parse_args()
    try:
        counts = mine_to_jsonl(
            args.root,
            args.project or Path(args.root).resolve().name,
            args.out,
            args.url,
            args.strict,
        )
    except MiningError as e:
        sys.exit(f"error: {e}")
    print(format_counts(counts))


if __name__ == "__main__":
    from data import cli

    cli(main)
