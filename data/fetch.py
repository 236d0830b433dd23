"""Fetch the pinned Java projects and mine each into one JSONL corpus file (§3.1 Dataset).

    python -m data.fetch                      # every project of data/projects.tsv
    python -m data.fetch commons-csv jimfs    # some of them (names from the TSV)
    python -m data.fetch /path/to/checkout    # a local checkout: mined as project `checkout`
    python -m data.fetch --role base          # only the base (or target) projects

How a project is fetched (../docs/methods2test.md §10), first that applies:
  1. a Debian source package, with apt's own tools under a PRIVATE apt configuration in
     data/cache/apt/ whose deb-src entries are derived from the system's configured Debian sources
     (/etc/apt is only read, and no mirror host name is written into the repository);
  2. `git clone --depth 1 --branch TAG URL` when the TSV row has no Debian package;
  3. a local path, used in place.
The upstream .orig tarball is checked against the .dsc's Checksums-Sha256 and only it is unpacked
(no Debian patches). Everything is idempotent and resumable: unpacked trees go to a temporary folder
that is renamed into place and then stamped; every output file is written to a temporary name and
renamed.
"""

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from data import CACHE, PROJECTS_TSV, cli, read_projects


def project_row(name):
    for row in read_projects():
        if name in (row["name"], row["debian_source"]):
            return row
    known = ", ".join(r["name"] for r in read_projects())
    raise SystemExit(
        f"unknown project {name!r}: not in {PROJECTS_TSV} (known: {known}); "
        "for your own checkout pass its path instead"
    )


# ---- Debian source packages through a private apt configuration ----


def deb_src(text, deb822):
    """deb-src entries for the Debian `deb` entries of one sources file (deb822 stanzas or
    one-line format)."""
    if deb822:  # blank-line separated stanzas: copy each, Types: deb -> Types: deb-src
        return [
            re.sub(r"^Types:.*$", "Types: deb-src", st.strip(), flags=re.M)
            for st in re.split(r"\n\s*\n", text)
            if re.search(r"^Types:.*\bdeb\b", st, re.M)
            and "debian" in st
            and not re.search(r"^Enabled:\s*no", st, re.M | re.I)
        ]
    return [
        "deb-src " + l.strip()[4:]
        for l in text.splitlines()
        if l.strip().startswith("deb ") and "debian" in l
    ]


def _system_deb_src():
    """(deb822 stanzas, one-line entries) derived from the system's configured sources; /etc/apt
    is only read."""
    out = subprocess.run(
        ["apt-config", "shell", "L", "Dir::Etc::sourcelist/f", "P", "Dir::Etc::sourceparts/d"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paths = dict(re.findall(r"(\w)='([^']*)'", out))
    parts = Path(paths["P"])
    lists = [Path(paths["L"])] + sorted(parts.glob("*.list"))
    stanzas = [
        st for f in sorted(parts.glob("*.sources")) for st in deb_src(f.read_text(), deb822=True)
    ]
    lines = [l for f in lists if f.is_file() for l in deb_src(f.read_text(), deb822=False)]
    if not stanzas and not lines:
        raise SystemExit(
            "no Debian apt sources configured on this system: cannot fetch Debian source packages"
        )
    return stanzas, lines


def apt_env(cache=CACHE):
    """Create the private apt tree once; return an environment whose APT_CONFIG selects it."""
    root = cache / "apt"
    conf = root / "apt.conf"
    if not conf.exists():
        for d in ["etc/sources.list.d", "lists/partial", "archives/partial"]:
            (root / d).mkdir(parents=True, exist_ok=True)
        stanzas, lines = _system_deb_src()
        _write(root / "etc/sources.list.d/derived.sources", "\n\n".join(stanzas) + "\n")
        _write(root / "etc/sources.list", "\n".join(lines) + "\n")
        _write(
            conf,
            f'Dir::Etc::SourceList "{root}/etc/sources.list";\n'
            f'Dir::Etc::SourceParts "{root}/etc/sources.list.d";\n'
            f'Dir::State::Lists "{root}/lists";\nDir::Cache "{root}";\n'
            # the download folders belong to us, not to _apt
            'APT::Sandbox::User "root";\n',
        )
    env = dict(os.environ, APT_CONFIG=str(conf))
    # `make -j`: one update, the other fetches wait for it
    with open(root / "update.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not any((root / "lists").glob("*Sources*")):
            print("apt-get update (private configuration)", flush=True)
            subprocess.run(
                ["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL
            )
    return env


def _dsc_sha256(dsc):
    """{file name: sha256} from the Checksums-Sha256 field of a .dsc."""
    m = re.search(r"^Checksums-Sha256:\n((?: .*\n?)+)", dsc.read_text(errors="replace"), re.M)
    return {f: h for h, _size, f in (l.split() for l in m.group(1).splitlines())} if m else {}


def fetch_debian(row, dest, cache=CACHE):
    src, version = row["debian_source"], row["version"]
    dl = cache / "download" / src
    dl.mkdir(parents=True, exist_ok=True)
    upstream = version.split(":")[-1].rsplit("-", 1)[0]  # 1:4.1.48-7+deb12u2 -> 4.1.48
    origs = sorted(dl.glob(f"{src}_{upstream}.orig*.tar.*"))
    if not origs or not list(dl.glob("*.dsc")):
        # apt-get exits non-zero if ANY file of the source package fails; we judge by the
        # checksummed tarball
        r = subprocess.run(
            ["apt-get", "source", "--download-only", "-q", f"{src}={version}"],
            cwd=dl,
            env=apt_env(cache),
            capture_output=True,
            text=True,
        )
        origs = sorted(dl.glob(f"{src}_{upstream}.orig*.tar.*"))
        if not origs:
            raise SystemExit(
                f"{row['name']}: apt-get source {src}={version} gave no upstream tarball:\n"
                f"{r.stderr[-800:]}"
            )
    sums = {}
    for dsc in dl.glob(f"{src}_*.dsc"):
        sums.update(_dsc_sha256(dsc))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for tb in origs:
        digest = hashlib.sha256(tb.read_bytes()).hexdigest()
        if sums.get(tb.name) != digest:
            # a corrupt or unlisted download is removed so the next run fetches it again
            tb.unlink()
            raise SystemExit(
                f"{row['name']}: {tb.name} does not match the .dsc's Checksums-Sha256; removed it"
            )
        comp = re.search(r"\.orig-([\w.-]+)\.tar\.", tb.name)
        _untar(tb, tmp / comp.group(1) if comp else tmp)
    tmp.rename(dest)


def _untar(tarball, into):
    """Unpack, dropping the single top-level folder; refuse members that escape the target."""
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers() if m.isfile() or m.isdir()]  # no links, devices
        tops = {m.name.split("/")[0] for m in members}
        strip = len(tops) == 1 and any("/" in m.name for m in members)
        into.mkdir(parents=True, exist_ok=True)
        for m in members:
            parts = m.name.split("/")[1:] if strip else m.name.split("/")
            if not parts or ".." in parts or m.name.startswith("/"):
                continue
            m.name = "/".join(parts)
            tf.extract(m, into, filter="data") if hasattr(tarfile, "data_filter") else tf.extract(
                m, into
            )


def fetch_git(row, dest):
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = (
        ["git", "clone", "--depth", "1"]
        + (["--branch", row["git_tag"]] if row["git_tag"] else [])
        + [row["git_url"], str(tmp)]
    )
    if subprocess.run(cmd).returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"{row['name']}: {' '.join(cmd)} failed")
    tmp.rename(dest)


def _source(row):
    """What a project's stamp (and its corpus counts) record: the exact source that was fetched."""
    return (
        f"{row['debian_source']}={row['version']}"
        if row["debian_source"]
        else f"{row['git_url']}@{row['git_tag']}"
    )


def fetch(row, cache=CACHE):
    """Unpacked source tree of one pinned project (fetched once, then reused): its path."""
    dest, stamp = cache / "src" / row["name"], cache / "src" / f"{row['name']}.stamp"
    want = _source(row)
    if stamp.exists() and stamp.read_text().strip() == want and dest.is_dir():
        return dest
    shutil.rmtree(dest, ignore_errors=True)  # unstamped or another version: start over
    dest.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    fetch_debian(row, dest, cache) if row["debian_source"] else fetch_git(row, dest)
    _write(stamp, want + "\n")
    print(f"{row['name']}: fetched {want} in {time.time() - t:.0f}s", flush=True)
    return dest


def _write(path, text):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "projects",
        nargs="*",
        help="names from data/projects.tsv or paths of local checkouts (default: all)",
    )
    ap.add_argument("--role", choices=["base", "target"], help="only the projects with this role")
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--no-mine", action="store_true", help="fetch and unpack only")
    args = ap.parse_args()
    cache = Path(args.cache)
    names = args.projects or [r["name"] for r in read_projects() if args.role in (None, r["role"])]
    (cache / "corpus").mkdir(parents=True, exist_ok=True)
    summary, failed = [], []
    for name in names:
        local = Path(name).is_dir() or "/" in name
        if local:  # a local checkout: mined in place, named after its folder, re-mined on every run
            src, row = Path(name).resolve(), None
            if not src.is_dir():
                raise SystemExit(f"project path {name!r} does not exist or is not a folder")
            name, source, url = src.name, f"file:{src}", None
        else:
            row = project_row(name)
            src, source = fetch(row, cache), _source(row)
            url = (
                f"debian-source:{row['debian_source']}={row['version']}"
                if row["debian_source"]
                else row["git_url"]
            )
        if args.no_mine:
            continue
        # here: fetching alone needs no parser
        from data.mine import MiningError, format_counts, mine_to_jsonl

        out, counts_file = cache / "corpus" / f"{name}.jsonl", cache / "corpus" / f"{name}.counts"
        counts = (
            json.loads(counts_file.read_text()) if counts_file.exists() and out.exists() else {}
        )
        if local or counts.get("source") != source:  # not mined yet, or from another version
            t = time.time()
            try:
                counts = mine_to_jsonl(src, name, out, url=url)
            except MiningError as e:
                print(f"error: {name}: {e}", file=sys.stderr)
                failed.append(name)
                continue
            counts.update(source=source, seconds=round(time.time() - t, 1))
            _write(counts_file, json.dumps(counts))
        print(f"{name}: {format_counts(counts)}", flush=True)
        summary.append((name, counts))
    if summary:  # the table covers every project mined so far, not only this run's
        summary = [
            (p.stem, json.loads(p.read_text())) for p in sorted((cache / "corpus").glob("*.counts"))
        ]
        keys = [
            "files",
            "test_files",
            "test_classes",
            "by_path",
            "by_name",
            "test_cases",
            "name_match",
            "unique_call",
            "duplicates",
            "pairs",
            "unparsed",
            "seconds",
        ]
        rows = ["project\t" + "\t".join(keys)] + [
            n + "\t" + "\t".join(str(c.get(k, "")) for k in keys) for n, c in summary
        ]
        _write(cache / "corpus" / "summary.tsv", "\n".join(rows) + "\n")
        print(
            f"summary: {cache / 'corpus' / 'summary.tsv'}; "
            f"total pairs {sum(c['pairs'] for _, c in summary)}"
        )
    if failed:
        raise SystemExit(f"mining failed for {', '.join(failed)}")


if __name__ == "__main__":
    sys.exit(cli(main))
