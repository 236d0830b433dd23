"""Read the published methods2test dataset or corpus JSON into our records (§3.1 Dataset).

python -m data.methods2test PATH --out FILE.jsonl [--repo REPO_ID]

For a user who has the real data (github.com/microsoft/methods2test; its files are Git LFS objects,
which we could not inspect, see ../docs/methods2test.md §6-§7). Two layouts are read, from a
folder or straight from a .tar / .tar.bz2 archive:
  - dataset: `<repo_id>/<repo_id>_<n>.json`, one mapped test case each, with the five keys
    focal_class, focal_method, test_class, test_case, repository. We rebuild the five src_* strings
    from them (mine.corpus_strings), so dataset records look exactly like the ones data/mine.py
    writes.
  - corpus JSON: `<split>/<repo_id>/<repo_id>_<n>_corpus.json` with `target` and the five `src_*`
    strings; the methods2test fields are absent there, so these records have id, project, src, tgt
    and src_* only.
The layout is told apart per file by its keys. Identical (src, tgt) pairs of one repository are kept
once, as the miner does. Our `project` is the repository's repo_id (a string).
"""

import argparse
import json
import tarfile
from pathlib import Path

from data.java import collapse

LEVELS = ["src_fm", "src_fm_fc", "src_fm_fc_co", "src_fm_fc_ms", "src_fm_fc_ms_ff"]


def _json_files(path):
    """(name, parsed JSON) for every .json file under a folder or inside a tar archive, in name
    order."""
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.rglob("*.json")):
            yield f.relative_to(p).as_posix(), json.loads(f.read_text(encoding="utf-8"))
    elif p.is_file() and tarfile.is_tarfile(p):
        with tarfile.open(p) as tf:  # streamed: the released archives are large
            for m in tf:
                if m.isfile() and m.name.endswith(".json"):
                    yield m.name, json.loads(tf.extractfile(m).read().decode("utf-8"))
    elif p.is_file() and p.suffix == ".json":
        yield p.name, json.loads(p.read_text(encoding="utf-8"))
    else:
        raise FileNotFoundError(
            f"{path}: not a folder, .json file or tar archive of methods2test JSON"
        )


def from_dataset(name, d):
    from data.mine import corpus_strings  # the same builder as our own records

    strings = corpus_strings(d["focal_class"], d["focal_method"])
    project = str(d["repository"].get("repo_id", Path(name).parent.name))
    return {
        "id": Path(name).stem,
        "project": project,
        "src": strings["src_fm_fc_ms_ff"],
        "tgt": collapse(d["test_case"]["body"]),
        **strings,
        **{
            k: d[k]
            for k in ("focal_class", "focal_method", "test_class", "test_case", "repository")
        },
    }


def from_corpus(name, d):
    stem = Path(name).stem.removesuffix("_corpus")
    project = Path(name).parent.name or stem.rsplit("_", 1)[0]
    missing = [k for k in LEVELS if k not in d]
    if missing:
        raise ValueError(f"{name}: corpus record without {missing}")
    return {
        "id": stem,
        "project": project,
        "src": collapse(d["src_fm_fc_ms_ff"]),
        "tgt": collapse(d["target"]),
        **{k: collapse(d[k]) for k in LEVELS},
    }


def read_methods2test(path, repo=None):
    """All records under `path` (optionally of one repo_id only), de-duplicated per repository."""
    seen, out = set(), []
    for name, d in _json_files(path):
        if "focal_method" in d:
            r = from_dataset(name, d)
        elif "target" in d:
            r = from_corpus(name, d)
        else:
            raise ValueError(
                f"{name}: neither a methods2test dataset record nor a corpus record "
                f"(keys {sorted(d)})"
            )
        if repo is not None and r["project"] != str(repo):
            continue
        key = (r["project"], r["src"], r["tgt"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    if not out:
        raise ValueError(
            f"{path}: no methods2test records" + (f" of repository {repo}" if repo else "")
        )
    return out


def main():
    ap = argparse.ArgumentParser(
        description="Convert methods2test dataset/corpus JSON to our JSONL records."
    )
    ap.add_argument("path", help="folder, .json file or .tar(.bz2) archive")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repo", help="keep only this repo_id")
    args = ap.parse_args()
    records = read_methods2test(args.path, args.repo)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(
        f"{len(records)} records from {len({r['project'] for r in records})} repositories -> {out}"
    )


if __name__ == "__main__":
    main()
