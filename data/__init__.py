"""data/: real Java projects -> methods2test-style focal-method/test-case pairs -> corpus,
tokenizer, folds (§3.1).

    make data                        # fetch + mine every project of data/projects.tsv
                                     # (python -m data.fetch)
    make data PROJECT=/path/to/repo  # mine your own checkout -> data/cache/corpus/<folder>.jsonl

Files: projects.tsv (the pinned Debian source packages), fetch.py (apt/git/local fetch + mining
driver), java.py (tree-sitter parsing, methods2test's TestParser), mine.py (the mapping rules and
records; CLI `python -m data.mine DIR --project NAME --out FILE.jsonl`), methods2test.py (reader of
the published dataset and corpus JSON), tokenizer.py (byte-level BPE), and this file (loading and
folds). Generated files live in the git-ignored data/cache/: src/<name>/ (unpacked),
corpus/<name>.jsonl (records), tokenizer.json.

Public API for train.py / evaluate.py:
    load_project(name_or_path) -> list[dict]  # records of one project (a name, a .jsonl, or a
                                              # checkout path)
    load_projects(names) -> list[dict]        # several, concatenated in the given order
    folds(records, fold, k=4, seed=0, val_fraction=0.1) -> (train, val, test)
    read_projects() -> list[dict]             # rows of projects.tsv (name, debian_source,
                                              # version, ..., role)
    DEFAULT_TARGET, DEFAULT_BASE, TARGETS     # the `make train` defaults and the target list
    data.tokenizer.load_tokenizer(path), data.tokenizer.encode_pairs(tok, records, max_src, max_tgt)
    data.methods2test.read_methods2test(path) # records from the published dataset/corpus JSON
    data.batch: padding, the target convention, the batches of training and of scoring
A record (../docs/design.md): id, project, src (= src_fm_fc_ms_ff), tgt, src_fm ... src_fm_fc_ms_ff,
and methods2test's focal_class, focal_method, test_class, test_case, repository.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"  # git-ignored: unpacked sources, mined corpora, tokenizer
PROJECTS_TSV = HERE / "projects.tsv"


def atomic_write(path, content):
    """Write `content` (a str, or a function that writes the file at the path it is given)
    through a temporary file in the same folder, then rename it into place: a reader never sees
    half a file, a kill leaves none."""
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(path)),
        prefix=".tmp-",
        suffix="-" + os.path.basename(path),
    )
    os.close(fd)
    try:
        if isinstance(content, str):
            Path(tmp).write_text(content, encoding="utf-8")
        else:
            content(tmp)
        # mkstemp makes the file 0600; the file a plain open() would have made follows the umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_projects(path=PROJECTS_TSV):
    """The pinned list as dicts (name, debian_source, version, git_url, git_tag, role), in file
    order."""
    lines = [l for l in Path(path).read_text().splitlines() if l.strip() and not l.startswith("#")]
    header = lines[0].split("\t")
    rows = [l.split("\t") for l in lines[1:]]
    return [dict(zip(header, r + [""] * (len(header) - len(r)))) for r in rows]


# `make train` defaults (the Makefile repeats them as PROJECT / BASE_PROJECTS). The target: Apache
# Commons IO, 524 pairs in 78 mapped test classes, the spec's worked example. The base: every base
# project of projects.tsv, 33 projects and 20,933 pairs; fewer base projects make a base that reads
# its input less on projects it has not seen (README, "The base model": runs E and H). A subset is
# one variable away (BASE_PROJECTS="grpc-java log4j2" in the Makefile, --base_projects for
# train.py, --projects for data.tokenizer).
# methods2test's levels: record["src_" + level]
FOCAL_CONTEXTS = ("fm", "fm_fc", "fm_fc_co", "fm_fc_ms", "fm_fc_ms_ff")
DEFAULT_TARGET = "commons-io"
DEFAULT_BASE = [r["name"] for r in read_projects() if r["role"] == "base"]
TARGETS = [r["name"] for r in read_projects() if r["role"] == "target"]


def load_project(name_or_path):
    """Records of one project: a project name (its mined JSONL in data/cache/corpus/), a .jsonl
    file, or the path of a checkout mined with `make data PROJECT=path` (found by the folder's
    name)."""
    p = Path(name_or_path)
    if p.suffix == ".jsonl":
        path = p
    else:
        name = p.resolve().name if p.is_dir() else str(name_or_path)
        if not p.is_dir() and name not in [r["name"] for r in read_projects()]:
            raise KeyError(
                f"unknown project {name!r}: not in data/projects.tsv and not a folder or "
                ".jsonl file"
            )
        path = CACHE / "corpus" / f"{name}.jsonl"
    if not path.exists():
        hint = (
            f"make data PROJECT={name_or_path}"
            if p.is_dir()
            else f"python -m data.fetch {name_or_path}"
        )
        raise FileNotFoundError(
            f"project {name_or_path!r} has no mined corpus at {path}; run `{hint}` first"
        )
    records = read_jsonl(path)
    for n, r in enumerate(records, 1):
        if not (isinstance(r, dict) and "tgt" in r and any(k.startswith("src") for k in r)):
            raise ValueError(
                f"{path}:{n}: not a record (a JSON object with a source and tgt): "
                "mine the corpus with "
                f"`python -m data.mine DIR --out {path.name}`"
            )
        bad = [
            k
            for k, v in r.items()
            if (k == "tgt" or k.startswith("src")) and not isinstance(v, str)
        ]
        missing = [k for k in ("id", "project") if k not in r]
        if bad or missing:
            what = f"{', '.join(bad)} not text" if bad else f"no {', '.join(missing)}"
            raise ValueError(
                f"{path}:{n}: a record with {what}: mine the corpus again with "
                f"`python -m data.mine DIR --out {path.name}`"
            )
    return records


def read_jsonl(path):
    """JSON lines -> list of values; non-UTF-8 text or broken JSON is an error naming the file
    and the line."""
    rows = []
    for n, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw.decode("utf-8")))
        # the first: not UTF-8 text; the second: not JSON
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{n}: not a UTF-8 JSON line ({e})") from None
    return rows


def cli(main, *args):
    """Run a command-line entry point: an expected error (a missing file, a bad value, a file of
    another kind, an unwritable folder) ends it with one line naming the input, not a traceback
    (DEBUG=1 shows the traceback)."""
    try:
        return main(*args)
    except (OSError, ValueError, KeyError) as e:
        if os.environ.get("DEBUG"):
            raise
        raise SystemExit(
            f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}"
        ) from None


def positive_int(text):
    """argparse type: an integer >= 1 (a count, a length, a size); anything else is argparse's
    one-line error."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def output_file(text):
    """argparse type: the path of a file to write. A folder, or a path under a file, is argparse's
    one-line error before any work is done."""
    import argparse

    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the path of a file in it")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise argparse.ArgumentTypeError(f"{parent} is not writable")
            break
    return text


def records_checksum(records):
    """sha256 of the records' content (key order aside): what binds a run to the corpus it split
    into folds."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def load_projects(names):
    return [r for n in names for r in load_project(n)]


def _h(seed, key):
    """A hash that is the same on every run and machine (Python's hash() of a str is salted per
    process)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _test_class(r):
    """The test class of a record, the unit that folds and the holdout keep whole."""
    return f"{r['project']}:{r['test_class']['file']}:{r['test_class']['identifier']}"


def _class_sizes(records):
    """{test class: its number of records}, in the order the classes first appear."""
    sizes = {}
    for r in records:
        g = _test_class(r)
        sizes[g] = sizes.get(g, 0) + 1
    return sizes


def folds(records, fold, k=4, seed=0, val_fraction=0.1):
    """(train, val, test) for fold `fold` of k, with whole test classes kept together.

    Test classes are taken in a seeded hash order and each goes to the fold holding the fewest
    records so far, so folds are balanced to within one class. `val` is carved from the k-1
    training folds, again whole classes, about val_fraction of them, for early stopping. Each
    split keeps the order of `records`."""
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
    sizes = _class_sizes(records)
    if len(sizes) < k + 1:
        raise ValueError(
            f"too few records for {k} folds plus validation: {len(records)} records in "
            f"{len(sizes)} "
            f"test classes; need at least {k + 1} test classes"
        )
    order = sorted(sizes, key=lambda g: _h(seed, g))
    load = [0] * k
    fold_of = {}
    for g in order:
        f = min(range(k), key=lambda i: (load[i], i))
        fold_of[g] = f
        load[f] += sizes[g]
    train_groups = [g for g in order if fold_of[g] != fold]
    if len(train_groups) < 2:
        raise ValueError(
            f"too few test classes ({len(sizes)}) to leave both training and validation classes"
        )
    budget = max(1, round(val_fraction * sum(sizes[g] for g in train_groups)))
    val_groups = set()
    n = 0
    for g in sorted(train_groups, key=lambda g: _h(f"val{seed}", g)):
        # skip classes that would overshoot: val stays close to its share
        if n + sizes[g] <= budget:
            val_groups.add(g)
            n += sizes[g]
    if not val_groups:  # every class is bigger than the budget: take the smallest one
        val_groups.add(min(train_groups, key=lambda g: (sizes[g], _h(seed, g))))

    out = {"train": [], "val": [], "test": []}
    for r in records:
        g = _test_class(r)
        if fold_of[g] == fold:
            out["test"].append(r)
        elif g in val_groups:
            out["val"].append(r)
        else:
            out["train"].append(r)
    return out["train"], out["val"], out["test"]


def holdout(records, fraction=0.05, seed=0, max_pairs=300):
    """(train, val) for the base: about `fraction` of the records, at most about `max_pairs` of
    them, held out for validation, whole test classes, chosen in a seeded hash order (the base
    has no test fold: its projects are never scored). The cap: every evaluation scores the whole
    validation set (5% of all 33 base projects would be 1,049 pairs); 300 pairs are some 30,000
    target tokens."""
    sizes = _class_sizes(records)
    if len(sizes) < 2:
        raise ValueError(
            f"the base corpus has {len(sizes)} test class(es); it needs two to hold one out for "
            "validation"
        )
    held = set()
    n = 0
    for g in sorted(sizes, key=lambda g: _h(f"holdout{seed}", g)):
        if n < min(fraction * len(records), max_pairs) and len(held) < len(sizes) - 1:
            held.add(g)
            n += sizes[g]
    train = [r for r in records if _test_class(r) not in held]
    val = [r for r in records if _test_class(r) in held]
    return train, val


def other_class_partners(records):
    """For each record, the index of a record of ANOTHER focal class OF THE SAME PROJECT where
    the project has two (else of another project): the source it is scored against when measuring
    whether a model reads its input (`source_gain`, docs/source-gain.md). The same project, so
    that the check measures reading the focal method, not recognising which project a source
    comes from (the base's validation mixes projects; a target's test fold has one). Within a
    project, records are ordered by focal class (seeded hash order) and each is paired with the
    one half-way round, skipping forward past its own class: a neighbour of the same class (folds
    keep test classes together) is never the partner. Records of one focal class only (a small
    project's validation split): the partner is a record of another focal method of that class."""

    def key(r):
        return f"{r['project']}:{r['focal_class']['file']}:{r['focal_class']['identifier']}"

    keys = [key(r) for r in records]
    if len(set(keys)) < 2:
        keys = [r.get("src_fm") or r.get("src") for r in records]  # the focal method itself
    if len(set(keys)) < 2:
        raise ValueError(
            f"source_gain needs records of at least two focal methods, got {len(set(keys))} "
            f"({len(records)} records): the split is too small to tell whether a model reads "
            "its input"
        )
    by_project = {}
    for i, r in enumerate(records):
        by_project.setdefault(r["project"], []).append(i)
    partner = [0] * len(records)
    for members in by_project.values():
        # one class: other projects
        pool = members if len({keys[i] for i in members}) > 1 else range(len(records))
        order = sorted(pool, key=lambda i: (_h(0, keys[i]), i))
        pos = {i: p for p, i in enumerate(order)}
        n = len(order)
        for i in members:
            # half-way round from i, then forward past i's own class
            halfway = pos.get(i, 0) + n // 2
            ring = (order[(halfway + s) % n] for s in range(n))
            partner[i] = next(j for j in ring if keys[j] != keys[i])
    return partner
