"""The execution harness (issue 30; beyond the paper's §3.3 text metrics): compiles and runs the
tests a run's models generated, in the real test class of each test-fold pair, and scores them.

    python execute.py runs/<name> [--k 5] [--timeout 10] [--jobs 2] [--no-cache] [--merge]
    python execute.py --project commons-io [--fold 0]   # harness_valid of a fold, no run needed
    python execute.py --packages      # the Debian packages the harness needs (make setup-java)
    make execute RUN=runs/<name>  # also --merge: the figures go into its metrics.json

For each pair of the run's test fold, each of a model's k beams (a one-line Java test method)
replaces the reference method's text in the pair's test class; the class is compiled against the
project's classes (its Debian jar, or its main sources compiled once), the jars of its Debian
dependencies and the test libraries, with `javac -sourcepath` over the test tree so that helper
classes compile on demand, and that one method is run with JUnit. The reference itself, inserted
the same way, must compile and pass: `harness_valid` is the share of pairs where it does, and the
models are scored on those pairs only: compile@1, compile@k, pass@1, pass@k and focal_covered@k (a
passing test that executes its focal method, measured with the JaCoCo agent).

Every run of a test is sandboxed (bubblewrap): no network, a read-only view of the machine with a
throwaway tmpfs working folder and /tmp, limits on wall time (--timeout per test), CPU time,
address space, processes (as an unprivileged uid of its own), file size and open files. Details
and measured figures: docs/execution.md. Results per candidate are cached under
data/cache/exec/<project>/results/; runs/<name>/execution.json holds every outcome.
"""

import argparse
import ast
import dataclasses
import hashlib
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import data

ROOT = Path(__file__).resolve().parent
JAVA_SOURCES = ROOT / "java"
EXEC_CACHE = data.CACHE / "exec"
SHARE = Path("/usr/share/java")
# bump when a change to the harness changes outcomes: cached results of older versions are unused
HARNESS_VERSION = 1
# JaCoCo 0.8.6 (Debian's) instruments class files up to Java 15; everything is compiled for 11
JAVA_RELEASE = "11"
K = 5

# --- the sandbox's limits
# -----------------------------------------------------------------------
# each concurrent sandbox runs as its own uid, which no account should hold: RLIMIT_NPROC counts
# every task of a uid, and it does not bind root
UID_BASE = 64000
# tasks (threads included) of one sandbox: a JVM with its JUnit run needs about 30
NPROC = 256
# address space of the JVM: its heap is -Xmx512m, the rest is code, metaspace, stacks
ADDRESS_SPACE = 3 * 1024**3
FILE_SIZE = 64 * 1024**2
TMPFS_SIZE = 256 * 1024**2
OPEN_FILES = 1024
# seconds the JVM gets to start and reach its first test
STARTUP_SECONDS = 60
# candidates of one test class in one JVM, each in its own class loader
BATCH = 40
JVM_OPTIONS = [
    "-Xmx512m",
    "-Xss1m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:ReservedCodeCacheSize=64m",
    "-XX:MaxMetaspaceSize=256m",
    "-XX:CompressedClassSpaceSize=128m",
    "-XX:MaxDirectMemorySize=128m",
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
    "-Djava.io.tmpdir=/tmp",
    "-Duser.home=/tmp/work",
    "-Duser.language=en",
    "-Duser.country=US",
    "-Duser.timezone=UTC",
    "-Dfile.encoding=UTF-8",
]

# --- what each target project needs (data/projects.tsv's targets)
# -----------------------------------------
# packages: the project's own Debian binary packages (its main classes); test_packages: what its
# tests need beyond JUnit and Hamcrest; compile: main source roots of modules that no Debian jar
# holds, compiled once; test_roots: the javac -sourcepath; resources: folders on the classpath.
# A project not listed: every src/main/java compiled, every src/test/java and resources folder.
PROJECTS = {
    "commons-io": dict(
        packages=["libcommons-io-java"],
        test_packages=["libcommons-lang3-java", "libmockito-java", "libjimfs-java"],
        compile=[],
        test_roots=["src/test/java"],
        resources=["src/test/resources"],
    ),
    "commons-collections4": dict(
        packages=["libcommons-collections4-java"],
        test_packages=["libcommons-lang3-java", "libeasymock-java"],
        compile=[],
        test_roots=["src/test/java"],
        resources=["src/test/resources"],
    ),
    "okhttp": dict(
        packages=["libokhttp-java"],
        test_packages=["libbcprov-java", "libbcpkix-java", "libjsr305-java"],
        compile=[
            "okhttp-testing-support/src/main/java",
            "mockwebserver/src/main/java",
            "okhttp-logging-interceptor/src/main/java",
            "okhttp-dnsoverhttps/src/main/java",
        ],
        test_roots=[
            "okhttp-tests/src/test/java",
            "okhttp-logging-interceptor/src/test/java",
            "okhttp-tls/src/test/java",
            "okhttp-dnsoverhttps/src/test/java",
            "mockwebserver/src/test/java",
        ],
        resources=["okhttp-tests/src/test/resources"],
    ),
    "jdom2": dict(
        packages=["libjdom2-java"],
        test_packages=["libjaxen-java", "libxerces2-java"],
        compile=[],
        test_roots=["test/src/java"],
        resources=["test/src/resources"],
    ),
    "opencsv": dict(
        packages=["libopencsv-java"],
        test_packages=["libmockito-java", "libcommons-lang3-java", "libcommons-text-java"],
        compile=[],
        test_roots=["src/test/java"],
        resources=["src/test/resources"],
    ),
}
# the harness's own: the sandbox, JUnit 5 (the console launcher's jar holds the platform, Jupiter
# and Vintage), JUnit 4, Hamcrest, JaCoCo (agent and analysis), ASM (JaCoCo's)
HARNESS_PACKAGES = [
    "bubblewrap",
    "util-linux",
    "junit5",
    "junit4",
    "libhamcrest-java",
    "libjacoco-java",
    "libasm-java",
]
# first on every classpath, in this order: Hamcrest 2 before the JUnit jars that bundle Hamcrest 1
TEST_LIBRARIES = ["hamcrest.jar", "junit4.jar", "junit-platform-console-standalone.jar"]
COVERAGE_LIBRARIES = ["org.jacoco.core.jar", "asm.jar", "asm-commons.jar", "asm-tree.jar"]


def all_packages():
    """Every Debian package the harness and the listed targets need, for `make setup-java`."""
    names = list(HARNESS_PACKAGES)
    for spec in PROJECTS.values():
        for name in spec["packages"] + spec["test_packages"]:
            if name not in names:
                names.append(name)
    return names


# --- what this machine has
# ------------------------------------------------------------------------
def java_problem():
    """None when javac, java and the harness's jars are here; else why the harness cannot run."""
    for tool in ("javac", "java"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (install a JDK, then `make setup-java`)"
    missing = [j for j in TEST_LIBRARIES + COVERAGE_LIBRARIES if not (SHARE / j).is_file()]
    if not (SHARE / "org.jacoco.agent.jar").is_file():
        missing.append("org.jacoco.agent.jar")
    if missing:
        return f"missing {', '.join(missing)} in {SHARE} (run `make setup-java`)"
    return None


_SANDBOX_PROBLEM = []


def sandbox_problem():
    """None when the sandbox works here (checked once: bwrap runs `true` as the sandbox's uid);
    else why not. Generated code is never run outside it."""
    if _SANDBOX_PROBLEM:
        return _SANDBOX_PROBLEM[0]
    problem = None
    for tool in ("bwrap", "prlimit", "setpriv"):
        if shutil.which(tool) is None:
            problem = f"no {tool} on PATH (run `make setup-java`)"
    if problem is None and os.geteuid() != 0:
        problem = "the sandbox runs tests as uids of their own, which needs root"
    if problem is None:
        probe = subprocess.run(
            sandbox_command(["true"], 0, [], {}, 10), capture_output=True, text=True, timeout=60
        )
        if probe.returncode != 0:
            problem = f"bwrap does not work here: {probe.stderr.strip()[-300:]}"
    _SANDBOX_PROBLEM.append(problem)
    return problem


# --- Debian jars
# ----------------------------------------------------------------------------------
_DPKG = {}


def _installed():
    """{installed package: [the names in its Depends]} (alternatives all listed), read once;
    empty where there is no dpkg (then every project's main sources are compiled)."""
    if _DPKG or shutil.which("dpkg-query") is None:
        return _DPKG
    fmt = "${Package}\t${db:Status-Abbrev}\t${Depends}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f=" + fmt], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or not fields[1].startswith("ii"):
            continue
        names = re.findall(r"([a-z0-9][a-z0-9+.-]+)(?::\w+)?\s*(?:\([^)]*\))?", fields[2])
        _DPKG[fields[0]] = names
    return _DPKG


def _package_jars(package):
    """The jars a package installed directly in /usr/share/java (dpkg's file list)."""
    info = Path("/var/lib/dpkg/info")
    lists = [info / f"{package}.list"] + sorted(info.glob(f"{package}:*.list"))
    jars = []
    for path in lists:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(f"{SHARE}/") and line.endswith(".jar") and line.count("/") == 4:
                    jars.append(line)
    return jars


def debian_jars(packages):
    """(jars, missing packages): the jars of `packages` and of their installed Depends, each jar
    once (by the file a link points to), in breadth-first order."""
    installed = _installed()
    missing = [p for p in packages if p not in installed]
    queue = [p for p in packages if p in installed]
    seen = set(queue)
    jars = []
    real = set()
    while queue:
        package = queue.pop(0)
        for jar in _package_jars(package):
            if os.path.realpath(jar) not in real and os.path.exists(jar):
                real.add(os.path.realpath(jar))
                jars.append(jar)
        for dep in installed.get(package, []):
            if dep in installed and dep not in seen:
                seen.add(dep)
                queue.append(dep)
    return jars, missing


# --- the Java helpers (java/*.java), compiled once
# --------------------------------------------------------
def _fingerprint(paths):
    """sha256 over paths with their sizes and modification times (folders: every file in
    them)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat() if f.exists() else None
            h.update(f"{f}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()


_JAVA_VERSION = []


def _java_version():
    """The first line of `java -version` (asked once)."""
    if not _JAVA_VERSION:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True)
        _JAVA_VERSION.append(out.stderr.splitlines()[0] if out.stderr else "unknown")
    return _JAVA_VERSION[0]


def _publish_dir(tmp, final):
    """Moves a finished folder into place; another process that got there first wins."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def helpers():
    """(folder of the compiled helpers, JaCoCo agent jar), built on first use under
    data/cache/exec/ (temporary folder, then a rename: never half-built)."""
    EXEC_CACHE.mkdir(parents=True, exist_ok=True)
    # the sandbox's uid reads the helpers, the agent and the compiled classes from here
    os.chmod(EXEC_CACHE, 0o755)
    sources = sorted(JAVA_SOURCES.glob("*.java"))
    libs = [str(SHARE / j) for j in TEST_LIBRARIES + COVERAGE_LIBRARIES]
    key = hashlib.sha256((_fingerprint(sources) + _java_version()).encode()).hexdigest()[:16]
    final = EXEC_CACHE / f"helpers-{key}"
    if not final.is_dir():
        tmp = tempfile.mkdtemp(dir=EXEC_CACHE, prefix=".tmp-helpers-")
        cmd = ["javac", "-proc:none", "--release", JAVA_RELEASE, "-nowarn", "-d", tmp]
        cmd += ["-cp", os.pathsep.join(libs)] + [str(s) for s in sources]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"java/*.java do not compile: {out.stderr.strip()[:500]}")
        _readable(tmp)
        _publish_dir(tmp, final)
    agent = EXEC_CACHE / "jacocoagent-0.8.6.jar"
    if not agent.is_file():
        # Debian's org.jacoco.agent.jar carries the runnable agent as a resource
        with zipfile.ZipFile(SHARE / "org.jacoco.agent.jar") as z:
            blob = z.read("jacocoagent.jar")

        def write(path):
            Path(path).write_bytes(blob)
            os.chmod(path, 0o644)

        data.atomic_write(agent, write)
    return final, agent


# --- a project: its classpath and source roots
# ------------------------------------------------------------
@dataclasses.dataclass
class Project:
    """Where a project's code is and what its tests compile and run against."""

    name: str
    root: Path
    shared: list
    own: list
    test_roots: list
    missing: list
    fingerprint: str

    @property
    def classpath(self):
        """What the tests compile against: test libraries, dependencies, the project's own."""
        return self.shared + self.own


def _spec(name, root):
    """PROJECTS[name], or for a project not listed: every src/main/java compiled, every
    src/test/java on the source path, every resources folder on the classpath."""
    if name in PROJECTS:
        return PROJECTS[name]

    def found(pattern):
        return sorted(str(p.relative_to(root)) for p in root.glob(pattern) if p.is_dir())

    return dict(
        packages=[],
        test_packages=[],
        compile=found("**/src/main/java"),
        test_roots=found("**/src/test/java"),
        resources=found("**/src/test/resources") + found("**/src/main/resources"),
    )


def project_env(name, root, compile_helpers):
    """The Project for `name` with its sources at `root`: Debian jars resolved, the main sources
    that need it compiled (cached), test roots and resources that exist."""
    root = Path(root).resolve()
    spec = _spec(name, root)
    own, missing = debian_jars(spec["packages"])
    deps, missing_tests = debian_jars(spec["test_packages"])
    tests = [str(SHARE / j) for j in TEST_LIBRARIES]
    compile_roots = list(spec["compile"])
    # no Debian jar of the project: its main sources, compiled once
    if not own and not compile_roots:
        compile_roots = [str(p.relative_to(root)) for p in root.glob("**/src/main/java")]
    shared = tests + [j for j in deps if j not in own]
    compiled = compile_main(name, root, compile_roots, shared + own, compile_helpers)
    resources = [str(root / r) for r in spec["resources"] if (root / r).is_dir()]
    main_resources = [str((root / r).parent / "resources") for r in compile_roots]
    resources += [r for r in main_resources if Path(r).is_dir()]
    test_roots = [str(root / r) for r in spec["test_roots"] if (root / r).is_dir()]
    everything = shared + own + compiled + resources + test_roots
    key = _fingerprint(everything) + _java_version() + f"v{HARNESS_VERSION}"
    return Project(
        name=name,
        root=root,
        shared=shared,
        own=own + compiled + resources,
        test_roots=test_roots,
        missing=missing + missing_tests,
        fingerprint=hashlib.sha256(key.encode()).hexdigest(),
    )


def compile_main(name, root, roots, classpath, compile_helpers):
    """Folders of class files for the main source roots `roots` (relative to `root`), each
    compiled once into data/cache/exec/<name>/main-<hash>/ against `classpath` and the roots
    before it. A root that does not compile is left out, with a warning naming javac's error."""
    out = []
    for rel in roots:
        src = root / rel
        files = sorted(str(f) for f in src.rglob("*.java"))
        if not files:
            continue
        key = _fingerprint([src] + classpath + out) + _java_version()
        final = EXEC_CACHE / name / f"main-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        if not final.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(final.parent, 0o755)
            tmp = tempfile.mkdtemp(dir=final.parent, prefix=".tmp-main-")
            job = CompileJob(index=0, out=tmp, files=files, sourcepath=[], encoding="UTF-8")
            result = run_compiler([job], classpath + out, compile_helpers, threads=1)[0]
            if not result[0]:
                shutil.rmtree(tmp, ignore_errors=True)
                print(f"warning: {name}: {rel} left out: {result[2]}", file=sys.stderr)
                continue
            _readable(tmp)
            _publish_dir(tmp, final)
        out.append(str(final))
    return out


# --- compiling: many classes in one JVM (java/ExecCompile.java)
# -------------------------------------------
@dataclasses.dataclass
class CompileJob:
    index: int
    out: str
    files: list
    sourcepath: list
    encoding: str


def run_compiler(jobs, classpath, compile_helpers, threads):
    """{job index: (compiled, line, message)} for CompileJobs, all compiled by one ExecCompile
    JVM with `threads` compiler threads; annotation processing off. compiled is None where the
    compiler JVM gave no answer."""
    lines = ["CP\t" + os.pathsep.join(classpath)]
    state = None
    for job in sorted(jobs, key=lambda j: (j.sourcepath, j.encoding)):
        if state != (job.sourcepath, job.encoding):
            state = (job.sourcepath, job.encoding)
            lines.append("SP\t" + os.pathsep.join(job.sourcepath))
            lines.append(f"OPT\t--release\t{JAVA_RELEASE}\t-encoding\t{job.encoding}")
        lines.append("\t".join(["JOB", str(job.index), job.out] + job.files))
    # deep generated code (nested loops) needs a deep javac stack
    cmd = ["java", "-Xss16m", "-XX:+UseParallelGC", "-cp", str(compile_helpers), "ExecCompile"]
    out = subprocess.run(
        cmd + [str(threads)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=600 + 20 * len(jobs),
    )
    results = {}
    for line in out.stdout.splitlines():
        fields = line.split("\t")
        if fields[0] == "OK":
            results[int(fields[1])] = (True, 0, "")
        elif fields[0] == "ERR" and len(fields) >= 4:
            results[int(fields[1])] = (False, int(fields[2]), fields[3])
    # a job the compiler JVM never answered (it died): None, a harness error
    for job in jobs:
        if job.index not in results:
            tail = out.stderr.strip()[-300:]
            results[job.index] = (None, 0, f"the compiler JVM gave no answer: {tail}")
    return results


# --- pairs and candidates: the test class with a candidate in place of the reference
# ----------------------
class PairError(ValueError):
    """A pair the harness cannot set up (its test file or method not found): the reason."""


@dataclasses.dataclass
class Pair:
    """One test-fold pair: its test class's text, where the reference method is, its focal."""

    id: str
    class_name: str
    file_name: str
    text: str
    start: int
    end: int
    encoding: str
    sourcepath: list
    module_root: str
    focal_class: str
    focal_method: str
    focal_params: str
    reference: str


def _field(record, key):
    """A methods2test field: a dict, or its repr as some corpora store it."""
    value = record.get(key)
    if isinstance(value, str):
        value = ast.literal_eval(value)
    if not isinstance(value, dict):
        raise PairError(f"record {record.get('id')} has no {key}")
    return value


def _read_java(path):
    """(text, javac's name of its encoding): UTF-8, else Latin-1 (every byte is a character)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "ISO-8859-1"


def _package(text):
    found = re.search(r"^\s*package\s+([\w.]+)\s*;", text, re.M)
    return found.group(1) if found else ""


def make_pair(project, record):
    """The Pair of a corpus record: its test class read from the project's tree, the reference
    method found by its original text. PairError when that cannot be done."""
    test_class = _field(record, "test_class")
    test_case = _field(record, "test_case")
    path = project.root / test_class["file"]
    if not path.is_file():
        raise PairError(f"test file {test_class['file']} not in {project.root}")
    text, encoding = _read_java(path)
    start = text.find(test_case["body"])
    if start < 0:
        start = text.find(test_case["body"].replace("\n", "\r\n"))
    if start < 0:
        raise PairError(f"method {test_case['identifier']} not found in {test_class['file']}")
    body_len = len(test_case["body"]) + text.count("\r\n", start, start + len(test_case["body"]))
    package = _package(text)
    # the source root: the file's folder less one folder per package name part
    own_root = path.parent
    depth = len(package.split(".")) if package else 0
    for _ in range(depth):
        own_root = own_root.parent
    # the working folder Maven gives the tests: the module's (else the project's) root
    module = project.root
    if own_root.parts[-3:] == ("src", "test", "java"):
        module = own_root.parent.parent.parent
    focal_class, focal_method, params = _focal(project, record)
    # a top-level class (methods2test's), named as the file or another in that file
    name = test_class["identifier"]
    return Pair(
        id=record["id"],
        class_name=f"{package}.{name}" if package else name,
        file_name=path.name,
        text=text,
        start=start,
        end=start + body_len,
        encoding=encoding,
        sourcepath=[str(own_root)] + [r for r in project.test_roots if r != str(own_root)],
        module_root=str(module),
        focal_class=focal_class,
        focal_method=focal_method,
        focal_params=params,
        reference=record["tgt"],
    )


def _focal(project, record):
    """(binary name of the focal class, focal method name or <init>, its parameter list)."""
    focal_class = _field(record, "focal_class")
    focal_method = _field(record, "focal_method")
    path = project.root / focal_class.get("file", "")
    package = _package(_read_java(path)[0]) if path.is_file() else ""
    name = focal_class["identifier"]
    method = "<init>" if focal_method.get("constructor") else focal_method["identifier"]
    # the declared parameters, for the reader of execution.json (every overload counts as run)
    params = " ".join(focal_method.get("parameters", "()").split())
    return (f"{package}.{name}" if package else name), method, params


_PARSER = []


def method_name(code):
    """Name of the first method the candidate declares (tree-sitter-java), '' when none."""
    if not _PARSER:
        import tree_sitter_java
        from tree_sitter import Language, Parser

        _PARSER.append(Parser(Language(tree_sitter_java.language())))
    tree = _PARSER[0].parse(f"class _ {{ {code} }}".encode())
    for cls in tree.root_node.named_children:
        body = cls.child_by_field_name("body")
        for node in body.named_children if body is not None else []:
            if node.type == "method_declaration":
                return node.child_by_field_name("name").text.decode()
    return ""


@dataclasses.dataclass
class Job:
    """One test class to compile and one method of it to run: a candidate or a reference."""

    key: str
    pair: Pair
    method: str
    source: str
    kind: str


def make_job(project, pair, code, timeout, kind="candidate"):
    """The Job for candidate `code` (a one-line test method) put in place of the pair's
    reference; kind "reference" runs in JVMs of its own. Its key covers everything the outcome
    depends on."""
    source = pair.text[: pair.start] + code + pair.text[pair.end :]
    method = method_name(code)
    what = [
        project.fingerprint,
        pair.class_name,
        method,
        source,
        pair.sourcepath,
        pair.module_root,
        pair.focal_class,
        pair.focal_method,
        pair.focal_params,
        timeout,
    ]
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()
    return Job(key=key, pair=pair, method=method, source=source, kind=kind)


def outcome(status, reason="", covered=None, seconds=0.0):
    """The record of one job: compiled, passed, focal_covered (None unless it passed and the
    coverage agent could tell), status and a short reason."""
    return {
        "compiled": status not in ("no_method", "compile_error"),
        "passed": status == "passed",
        "focal_covered": covered if status == "passed" else None,
        "status": status,
        "reason": reason[:300],
        "seconds": round(seconds, 3),
    }


# --- the sandbox
# ----------------------------------------------------------------------------------
def _hidden_ancestors(path):
    """Folders above `path` that a uid of no group cannot enter (it would not reach `path`)."""
    out = []
    for parent in reversed(Path(path).resolve().parents):
        mode = parent.stat().st_mode if parent.exists() else 0o755
        if str(parent) != "/" and not mode & 0o001:
            out.append(str(parent))
    return out


def sandbox_command(argv, slot, visible, links, cpu_seconds):
    """bwrap + prlimit + setpriv around argv: new pid, net (loopback only), ipc and uts
    namespaces; the machine read-only, /root and /home hidden, /tmp a fresh tmpfs with the
    working folder /tmp/work, where `links` {name: target} are symlinks (the project's module
    root); `visible` paths bound read-only at their own path (also when under a hidden folder);
    then the limits, and uid/gid UID_BASE + slot with no capabilities and no new privileges."""
    uid = str(UID_BASE + slot)
    cmd = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    cmd += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--ro-bind", "/", "/"]
    hidden = [d for d in ("/root", "/home") if os.path.isdir(d)]
    for path in visible:
        hidden += [d for d in _hidden_ancestors(path) if d not in hidden]
    for folder in hidden:
        cmd += ["--tmpfs", folder]
    cmd += ["--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--size", str(TMPFS_SIZE)]
    cmd += ["--tmpfs", "/tmp", "--perms", "1777", "--dir", "/tmp/work"]
    # the folders leading to a bound path inside a fresh tmpfs: made enterable (bwrap's own
    # are 0700), before the binds
    for folder in _folders_to_make(visible, hidden + ["/tmp", "/dev"]):
        cmd += ["--perms", "0755", "--dir", folder]
    for path in visible:
        cmd += ["--ro-bind", str(path), str(path)]
    for name, target in links.items():
        cmd += ["--symlink", str(target), f"/tmp/work/{name}"]
    cmd += ["--chdir", "/tmp/work", "--", "prlimit", f"--nproc={NPROC}"]
    cmd += [f"--as={ADDRESS_SPACE}", f"--cpu={cpu_seconds}", f"--fsize={FILE_SIZE}"]
    cmd += [f"--nofile={OPEN_FILES}", "--core=0", "--", "setpriv", f"--reuid={uid}"]
    cmd += [f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
    return cmd + ["--no-new-privs", "--"] + list(argv)


def _folders_to_make(paths, mounts):
    """The folders above each of `paths` that lie inside one of the tmpfs `mounts` (each once,
    parents first)."""
    out = []
    for path in paths:
        for parent in reversed(Path(path).parents):
            inside = any(parent.is_relative_to(m) and str(parent) != m for m in mounts)
            if inside and str(parent) not in out:
                out.append(str(parent))
    return out


def uid_processes(uid):
    """Process ids whose real uid is `uid` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        found = re.search(r"^Uid:\s+(\d+)", status, re.M)
        if found and int(found.group(1)) == uid:
            pids.append(int(entry))
    return pids


def _wait_gone(uid, seconds=10.0):
    """Waits until no process of the sandbox's uid is left (the kernel empties a pid namespace
    whose init died, but not at once): the next sandbox of this slot starts with none."""
    deadline = time.monotonic() + seconds
    while uid_processes(uid) and time.monotonic() < deadline:
        time.sleep(0.05)


# --- running: batches of compiled candidates in sandboxed JVMs (java/ExecRunner.java)
# ----------------------
def runner_command(project, batch, tools, job_file, slot, timeout):
    """The sandboxed ExecRunner command for `batch` [(job, class folder)]; the job file lies in
    its batch folder in the work folder, which holds the class folders."""
    compile_helpers, agent = tools
    focal = sorted({job.pair.focal_class for job, _ in batch if job.pair.focal_class})
    # only the focal classes are instrumented (by name: the test classes never are)
    options = [
        "output=none",
        "includes=" + ":".join(focal or ["none.Selected"]),
        "jmx=false",
        "dumponexit=false",
    ]
    coverage = [str(compile_helpers)] + [str(SHARE / j) for j in COVERAGE_LIBRARIES]
    classpath = [str(compile_helpers)] + project.shared
    java = [shutil.which("java")] + JVM_OPTIONS + [f"-javaagent:{agent}={','.join(options)}"]
    java += [f"-Dexec.coverage.path={os.pathsep.join(coverage)}"]
    java += [f"-Dexec.project.path={os.pathsep.join(project.own)}", "-cp"]
    java += [os.pathsep.join(classpath), "ExecRunner", str(job_file)]
    module = Path(batch[0][0].pair.module_root)
    links = {p.name: p for p in sorted(module.iterdir())}
    visible = [str(EXEC_CACHE), str(project.root), str(job_file.parent.parent)]
    visible += [p for p in project.classpath if not p.startswith(("/usr/", *visible))]
    cpu_seconds = STARTUP_SECONDS + len(batch) * timeout
    return sandbox_command(java, slot, visible, links, cpu_seconds)


def run_batch(project, batch, tools, work, slot, timeout):
    """Runs `batch` [(job, class folder)] in one sandboxed JVM, one test after another.
    Returns ({job key: outcome}, the entries never started, whether the JVM started at all, the
    tail of its stderr). A test past `timeout` seconds is killed with its sandbox; one that ends
    the JVM (System.exit, a crash) is recorded as such; the tests after it are returned to run
    in a fresh JVM."""
    nonce = secrets.token_hex(8)
    job_file = Path(tempfile.mkdtemp(dir=work, prefix="batch-")) / "jobs.tsv"
    os.chmod(job_file.parent, 0o755)
    rows = []
    for i, (job, classes) in enumerate(batch):
        pair = job.pair
        fields = [str(i), classes, pair.class_name, job.method, pair.focal_class]
        rows.append("\t".join(fields + [pair.focal_method]))
    job_file.write_text("\n".join(rows) + "\n")
    cmd = runner_command(project, batch, tools, job_file, slot, timeout)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    # a sandbox that fails at once has closed its end already
    try:
        proc.stdin.write((nonce + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    watched = watch(proc, nonce, timeout)
    _wait_gone(UID_BASE + slot)
    shutil.rmtree(job_file.parent, ignore_errors=True)
    results = {}
    for i, result in watched["ended"].items():
        results[batch[i][0].key] = result
    started = watched["started"]
    if started is not None:
        results[batch[started][0].key] = watched["death"]
    done = set(watched["ended"])
    if started is not None:
        done.add(started)
    rest = [entry for i, entry in enumerate(batch) if i not in done]
    return results, rest, watched["any_start"], watched["stderr"]


def _end_line(fields, seconds):
    """The outcome of an ExecRunner END line: index, status, covered, reason."""
    covered = {"yes": True, "no": False}.get(fields[2])
    return outcome(fields[1], " ".join(fields[3:]), covered, seconds)


def watch(proc, nonce, timeout):
    """Reads ExecRunner's protocol lines until the JVM ends or a test overruns `timeout`
    (then the sandbox is killed). Returns ended {index: outcome}, started (the index of a test
    that began and never ended, or None), death (its outcome), any_start, stderr (its tail)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    pending = b""
    stderr = b""
    ended = {}
    started = None
    any_start = False
    began = time.monotonic()
    deadline = began + STARTUP_SECONDS
    killed = False
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        for key, _ in sel.select(left):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
            elif key.fileobj is proc.stderr:
                stderr = (stderr + chunk)[-4000:]
            else:
                pending += chunk
        lines = pending.split(b"\n")
        # a test that floods the protocol's stream without a newline: its text is dropped
        pending = lines.pop()[-65536:]
        for line in lines:
            fields = line.decode("utf-8", "replace").split(" ")
            if len(fields) < 3 or fields[0] != nonce:
                continue
            now = time.monotonic()
            if fields[1] == "START":
                started = int(fields[2])
                any_start = True
                began = now
            elif fields[1] == "END" and len(fields) >= 5:
                ended[int(fields[2])] = _end_line(fields[2:], now - began)
                started = None
            deadline = now + timeout
    sel.close()
    code = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    seconds = time.monotonic() - began
    if killed:
        death = outcome("timeout", f"still running after {timeout} s: killed", None, seconds)
    else:
        death = outcome(
            "crashed", f"the JVM ended during the test (exit code {code})", None, seconds
        )
    tail = stderr.decode("utf-8", "replace").strip()
    return dict(ended=ended, started=started, death=death, any_start=any_start, stderr=tail)


def run_until_done(project, batch, tools, work, slot, timeout):
    """run_batch again on what a dying JVM left, until every entry has an outcome; a JVM that
    does not start twice in a row marks the rest as harness errors (never cached)."""
    results = {}
    no_start = 0
    while batch:
        got, rest, any_start, stderr = run_batch(project, batch, tools, work, slot, timeout)
        results.update(got)
        if any_start:
            no_start = 0
        else:
            no_start += 1
        if no_start >= 2:
            for job, _ in rest:
                why = f"the sandboxed JVM did not start: {stderr[-240:]}"
                results[job.key] = outcome("error", why)
            break
        batch = rest
    return results


def _batches(entries):
    """[(job, class folder)] -> lists of at most BATCH entries of one test class and kind."""
    groups = {}
    for job, classes in entries:
        groups.setdefault((job.pair.class_name, job.kind), []).append((job, classes))
    out = []
    for group in groups.values():
        for i in range(0, len(group), BATCH):
            out.append(group[i : i + BATCH])
    # the longest first: the pool ends together
    return sorted(out, key=len, reverse=True)


def run_compiled(project, entries, tools, work, timeout, workers):
    """{job key: outcome} for compiled entries, `workers` sandboxes at a time (slot i runs as
    uid UID_BASE + i)."""
    slots = list(range(workers))
    lock = threading.Lock()

    def one(batch):
        with lock:
            slot = slots.pop()
        try:
            return run_until_done(project, batch, tools, work, slot, timeout)
        finally:
            with lock:
                slots.append(slot)

    results = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for got in pool.map(one, _batches(entries)):
            results.update(got)
    return results


def _write_java(path, text, encoding):
    """The class in its file's encoding; a character Latin-1 lacks becomes a \\u escape."""
    if encoding == "UTF-8":
        Path(path).write_text(text, encoding="utf-8")
        return
    escaped = "".join(c if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)
    Path(path).write_text(escaped, encoding="latin-1")


def compile_jobs(project, jobs, tools, work, threads):
    """{job key: outcome or class folder}: each job's class compiled into a folder of its own
    under `work`; a failure is an outcome naming javac's first error and whether it lies in
    the candidate's line or elsewhere in the class."""
    requests = []
    for i, job in enumerate(jobs):
        src = Path(work) / "src" / str(i)
        out = Path(work) / "out" / str(i)
        src.mkdir(parents=True)
        out.mkdir(parents=True)
        _write_java(src / job.pair.file_name, job.source, job.pair.encoding)
        requests.append(
            CompileJob(
                index=i,
                out=str(out),
                files=[str(src / job.pair.file_name)],
                sourcepath=job.pair.sourcepath,
                encoding=job.pair.encoding,
            )
        )
    answers = run_compiler(requests, project.classpath, tools[0], threads)
    results = {}
    for i, job in enumerate(jobs):
        ok, line, message = answers[i]
        if ok:
            results[job.key] = str(Path(work) / "out" / str(i))
            continue
        if ok is None:
            results[job.key] = outcome("error", message)
            results[job.key]["compiled"] = False
            continue
        own_line = job.pair.text.count("\n", 0, job.pair.start) + 1
        where = (
            "in the candidate" if line == own_line else f"line {line} (the candidate's: {own_line})"
        )
        results[job.key] = outcome("compile_error", f"{where}: {message}")
    return results


def _readable(folder):
    """Everything under `folder` readable by the sandbox's uid, whatever this process's umask."""
    for parent, _dirs, files in os.walk(folder):
        os.chmod(parent, 0o755)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o644)


def _work_root(project):
    """Where a run's sources and classes are written and removed: /dev/shm (tmpfs) where there
    is one, else data/cache/exec/<project> (removing many small files is far faster from tmpfs;
    docs/execution.md has the measurement)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return EXEC_CACHE / project.name


def execute_jobs(project, jobs, timeout=10, workers=2, cache=True, timing=None):
    """{job key: outcome} for Jobs: cached outcomes read (cache=True), candidates without a
    method settled, the rest compiled in one JVM and the compiled ones run in sandboxes; new
    outcomes cached (timeouts and harness errors never). `timing` gets each phase's seconds and
    counts."""
    timing = {} if timing is None else timing
    tools = helpers()
    unique = {}
    for job in jobs:
        unique.setdefault(job.key, job)
    store = EXEC_CACHE / project.name / "results"
    results = {}
    todo = []
    for key, job in unique.items():
        if cache and (store / f"{key}.json").is_file():
            results[key] = json.loads((store / f"{key}.json").read_text())
        elif not job.method:
            results[key] = outcome("no_method", "the candidate declares no method")
        else:
            todo.append(job)
    timing.update(jobs=len(jobs), unique=len(unique), cached=len(unique) - len(todo))
    (EXEC_CACHE / project.name).mkdir(parents=True, exist_ok=True)
    os.chmod(EXEC_CACHE / project.name, 0o755)
    work = tempfile.mkdtemp(dir=_work_root(project), prefix=".tmp-work-")
    try:
        start = time.monotonic()
        compiled = compile_jobs(project, todo, tools, work, workers) if todo else {}
        timing["compile_s"] = time.monotonic() - start
        entries = []
        for job in todo:
            if isinstance(compiled[job.key], dict):
                results[job.key] = compiled[job.key]
            else:
                entries.append((job, compiled[job.key]))
        _readable(work)
        start = time.monotonic()
        results.update(run_compiled(project, entries, tools, work, timeout, workers))
        timing["run_s"] = time.monotonic() - start
        timing["compiled"] = len(entries)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cache:
        store.mkdir(parents=True, exist_ok=True)
        for job in todo:
            # a timeout may be the machine's load, a harness error its state: both run again
            if results[job.key]["status"] not in ("error", "timeout"):
                data.atomic_write(store / f"{job.key}.json", json.dumps(results[job.key]))
    return results


# --- a run: every test-fold pair, its reference and each model's k candidates
# ---------------------------
def _run_inputs(run):
    """(config, {id: record} of the test fold, predictions rows, model names) of a run folder;
    a missing or foreign file is one line saying what to do."""
    for name, hint in (
        ("config.json", "train it first (train.py)"),
        ("predictions.jsonl", f"score it first: python evaluate.py {run}"),
    ):
        if not (run / name).is_file():
            raise SystemExit(f"{run}: no {name}: {hint}")
    cfg = _read_json(run / "config.json", "train the run again (train.py)")
    missing = [k for k in ("project", "corpus", "fold", "k_folds", "seed") if k not in cfg]
    if missing:
        raise SystemExit(f"{run / 'config.json'}: no {', '.join(missing)}: not a run's config")
    records = data.load_project(cfg["corpus"])
    test = data.folds(records, cfg["fold"], cfg["k_folds"], cfg["seed"])[2]
    by_id = {r["id"]: r for r in test}
    rows = data.read_jsonl(run / "predictions.jsonl")
    for row in rows:
        if row.get("id") not in by_id:
            raise SystemExit(
                f"{run / 'predictions.jsonl'}: row {row.get('id')!r} is not a pair of the run's "
                f"test fold: score the run again (python evaluate.py {run})"
            )
    models = [m for m, v in (rows[0] if rows else {}).items() if isinstance(v, dict)]
    models = [m for m in models if "predictions" in rows[0][m]]
    return cfg, by_id, rows, models


def _read_json(path, hint):
    """A JSON file's content; a file that is not JSON is one line naming it and `hint`."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise SystemExit(f"{path}: not JSON ({e}): {hint}") from None


def _source_root(cfg, sources=None):
    """The project's source tree: `sources` when given, a checkout given as the corpus, else
    data/cache/src/<name> (where data.fetch unpacks it)."""
    corpus = Path(str(cfg["corpus"]))
    root = Path(sources) if sources else corpus if corpus.is_dir() else None
    root = root or data.CACHE / "src" / cfg["project"]
    if not root.is_dir():
        raise SystemExit(
            f"no sources of {cfg['project']} at {root}: fetch them (python -m data.fetch "
            f"{cfg['project']}) or give their folder (--sources DIR)"
        )
    return root


def not_run(reason, pairs, models, k):
    """The result when the harness cannot run here: every figure None, the reason said."""
    metrics = ["compile@1", f"compile@{k}", "pass@1", f"pass@{k}", f"focal_covered@{k}"]
    return {
        "status": f"not run: {reason}",
        "harness_valid": None,
        "pairs": pairs,
        "valid_pairs": None,
        "models": {m: dict.fromkeys(metrics) for m in models},
    }


def execute_run(run_dir, k=K, timeout=10, workers=None, cache=True, timing=None, sources=None):
    """Compiles and runs the reference and each model's first k candidates of every test-fold
    pair of a run; writes <run>/execution.json (atomically) and returns the summary:
    {"status", "harness_valid", "pairs", "valid_pairs", "models": {model: {"compile@1", ...}}}.
    Without a JDK or a working sandbox: every figure None and status "not run: <why>". The
    project's sources: `sources`, else where data.fetch put them."""
    run = Path(run_dir)
    cfg, by_id, rows, models = _run_inputs(run)
    problem = java_problem() or sandbox_problem()
    if problem:
        return not_run(problem, len(rows), models, k)
    root = _source_root(cfg, sources)
    report = execute_pairs(
        cfg["project"], root, by_id, rows, models, k, timeout, workers, cache, timing
    )
    report = {"run": run.name, **report}
    data.atomic_write(run / "execution.json", json.dumps(report, indent=1))
    return report["summary"]


def harness_check(
    name, fold=0, k_folds=4, seed=0, timeout=10, workers=None, cache=True, sources=None
):
    """harness_valid of a project's test fold without a run (the references only): the summary,
    with every pair's outcome in data/cache/exec/<name>/harness-f<fold>.json."""
    problem = java_problem() or sandbox_problem()
    if problem:
        return not_run(problem, 0, [], K)
    records = data.load_project(name)
    test = data.folds(records, fold, k_folds, seed)[2]
    by_id = {r["id"]: r for r in test}
    rows = [{"id": r["id"]} for r in test]
    root = _source_root({"corpus": name, "project": name}, sources)
    report = execute_pairs(name, root, by_id, rows, [], K, timeout, workers, cache, None)
    path = EXEC_CACHE / name / f"harness-f{fold}.json"
    data.atomic_write(path, json.dumps(report, indent=1))
    return report["summary"]


def execute_pairs(name, root, by_id, rows, models, k, timeout, workers, cache, timing):
    """The execution report of pairs (rows: {"id", model: {"predictions"}}; by_id: their
    records) of project `name` with sources at `root`: project, k, timeout, java, summary,
    pairs. `timing` gets the phases' seconds."""
    timing = {} if timing is None else timing
    workers = workers or min(2, os.cpu_count() or 1)
    start = time.monotonic()
    tools = helpers()
    project = project_env(name, root, tools[0])
    setups = {}
    jobs = []
    for row in rows:
        setup = _pair_jobs(project, by_id[row["id"]], row, models, k, timeout)
        setups[row["id"]] = setup
        if setup["pair"] is not None:
            jobs.append(setup["reference"])
        for model_jobs in setup["models"].values():
            jobs += model_jobs
    timing["prepare_s"] = time.monotonic() - start
    results = execute_jobs(project, jobs, timeout, workers, cache, timing)
    pairs = [_pair_entry(setups[row["id"]], results, models) for row in rows]
    diagnose_start = time.monotonic()
    _diagnose(project, setups, pairs, timeout, workers, cache)
    timing["diagnose_s"] = time.monotonic() - diagnose_start
    timing["total_s"] = time.monotonic() - start
    summary = summarize(pairs, models, k)
    if project.missing:
        summary["missing_packages"] = project.missing
    return {
        "project": name,
        "k": k,
        "timeout": timeout,
        "java": _java_version(),
        "summary": summary,
        "pairs": pairs,
    }


def _pair_jobs(project, record, row, models, k, timeout):
    """{"pair", "error", "reference": its job, "models": {model: its first k candidates' jobs}}
    for one pair; pair None (and error the reason) where it cannot be set up."""
    try:
        pair = make_pair(project, record)
    except PairError as e:
        return {"id": record["id"], "pair": None, "error": str(e), "reference": None, "models": {}}
    setup = {"id": record["id"], "pair": pair, "error": "", "models": {}}
    setup["reference"] = make_job(project, pair, pair.reference, timeout, kind="reference")
    for model in models:
        codes = row[model]["predictions"][:k]
        setup["models"][model] = [make_job(project, pair, code, timeout) for code in codes]
    return setup


def _pair_entry(setup, results, models):
    """The execution.json entry of one pair: its reference's outcome, valid (it compiled and
    passed), and each model's candidates' outcomes, best beam first."""
    pair = setup["pair"]
    if pair is None:
        reference = outcome("error", setup["error"])
        reference["compiled"] = False
        empty = {model: [] for model in models}
        return {"id": setup["id"], "valid": False, "reference": reference, "models": empty}
    reference = results[setup["reference"].key]
    entry = {
        "id": pair.id,
        "test_class": pair.class_name,
        "method": setup["reference"].method,
        "focal": f"{pair.focal_class}.{pair.focal_method}{pair.focal_params}",
        "reference": reference,
        "valid": reference["passed"],
        "models": {},
    }
    for model in models:
        entry["models"][model] = [results[job.key] for job in setup["models"][model]]
    return entry


def _diagnose(project, setups, pairs, timeout, workers, cache):
    """For each pair whose reference fails: the test class as it is on disk (the original,
    multi-line method) run the same way, which tells the one-line form's faults from the
    harness's. Stored as the entry's "original"."""
    failing = [(s, p) for s, p in zip(setups.values(), pairs) if s["pair"] and not p["valid"]]
    jobs = []
    for setup, _ in failing:
        pair = setup["pair"]
        original = pair.text[pair.start : pair.end]
        jobs.append(make_job(project, pair, original, timeout, kind="reference"))
    results = execute_jobs(project, jobs, timeout, workers, cache) if jobs else {}
    for job, (_, entry) in zip(jobs, failing):
        entry["original"] = results[job.key]


def summarize(pairs, models, k):
    """harness_valid and, per model over the valid pairs, compile@1, compile@k, pass@1, pass@k,
    focal_covered@k (a passing candidate that ran the focal method); also the share of valid
    references that run their focal method and why the invalid ones fail (status counts)."""
    valid = [p for p in pairs if p["valid"]]
    n = len(valid)

    def share(count):
        return count / n if n else None

    out = {
        "status": "ok",
        "harness_valid": len(valid) / len(pairs) if pairs else None,
        "pairs": len(pairs),
        "valid_pairs": n,
        "reference_focal_covered": share(sum(bool(p["reference"]["focal_covered"]) for p in valid)),
        "invalid": {},
        "models": {},
    }
    for p in pairs:
        if not p["valid"]:
            status = p["reference"]["status"]
            out["invalid"][status] = out["invalid"].get(status, 0) + 1
    for model in models:
        tops = [p["models"][model][:k] for p in valid]
        out["models"][model] = {
            "compile@1": share(sum(bool(c) and c[0]["compiled"] for c in tops)),
            f"compile@{k}": share(sum(any(x["compiled"] for x in c) for c in tops)),
            "pass@1": share(sum(bool(c) and c[0]["passed"] for c in tops)),
            f"pass@{k}": share(sum(any(x["passed"] for x in c) for c in tops)),
            f"focal_covered@{k}": share(
                sum(any(x["passed"] and bool(x["focal_covered"]) for x in c) for c in tops)
            ),
        }
    return out


def merge_metrics(run_dir, result):
    """Adds the execution figures of `result` (execute_run's) to <run>/metrics.json under each
    model's entry: compile@1 ... focal_covered@k, harness_valid, valid_pairs (None: not run),
    atomically and under the run's lock (not while evaluate.py writes the file)."""
    import fcntl

    run = Path(run_dir)
    path = run / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no metrics.json: score the run first (python evaluate.py {run})")
    with open(run / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"{run} is in use by another process (train.py or evaluate.py); wait for it"
            ) from None
        metrics = _read_json(path, f"score the run again (python evaluate.py {run})")
        add_figures(metrics, result)
        data.atomic_write(path, json.dumps(metrics, indent=1))
    return metrics


def add_figures(metrics, result):
    """metrics.json's dict, with the execution figures of `result` (execute_run's summary) added
    under each model's entry (also what evaluate.py keeps when it scores the run again)."""
    for model, figures in result["models"].items():
        if isinstance(metrics.get(model), dict):
            metrics[model].update(figures)
            metrics[model]["harness_valid"] = result["harness_valid"]
            metrics[model]["valid_pairs"] = result["valid_pairs"]
    return metrics


# --- the command line
# ------------------------------------------------------------------------------
def print_summary(result, timing):
    """The summary as a markdown table (one row per model) after its JSON."""
    print(json.dumps(result, indent=1))
    if result["harness_valid"] is None:
        print(result["status"])
        return
    print(
        f"\nharness_valid {100 * result['harness_valid']:.1f}% "
        f"({result['valid_pairs']} of {result['pairs']} pairs)"
    )
    names = list(next(iter(result["models"].values()), {}))
    print("| model | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for model, figures in result["models"].items():
        cells = ["-" if v is None else f"{100 * v:.1f}%" for v in figures.values()]
        print(f"| {model} | " + " | ".join(cells) + " |")
    phases = ("prepare_s", "compile_s", "run_s", "total_s")
    print("seconds: " + ", ".join(f"{p[:-2]} {timing[p]:.1f}" for p in phases if p in timing))


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Compile and run a run's generated tests in their test classes "
        "(sandboxed), write <run>/execution.json, print the summary"
    )
    ap.add_argument("run", nargs="?", help="a run folder with predictions.jsonl")
    ap.add_argument("--k", type=data.positive_int, default=K, help="candidates per model")
    ap.add_argument("--timeout", type=data.positive_int, default=10, help="seconds per test")
    ap.add_argument("--jobs", type=data.positive_int, help="sandboxes at a time (default 2)")
    ap.add_argument("--no-cache", action="store_true", help="ignore and keep no cached results")
    ap.add_argument("--merge", action="store_true", help="add the figures to metrics.json")
    ap.add_argument("--packages", action="store_true", help="print the Debian packages needed")
    ap.add_argument("--check", action="store_true", help="check the JDK and sandbox, build helpers")
    ap.add_argument("--project", help="harness_valid of a project's test fold (no run needed)")
    ap.add_argument("--fold", type=int, default=0, help="with --project: the fold (0-3)")
    ap.add_argument("--sources", help="the project's source tree (default data/cache/src/NAME)")
    a = ap.parse_args(argv)
    if a.packages:
        print(" ".join(all_packages()))
        return None
    if a.check:
        problem = java_problem() or sandbox_problem()
        print(f"execution harness: {problem or 'ready'}")
        if problem is None:
            print(f"helpers: {helpers()[0]}")
        return None
    if a.project:
        cache = not a.no_cache
        result = harness_check(a.project, a.fold, 4, 0, a.timeout, a.jobs, cache, a.sources)
        print(json.dumps(result, indent=1))
        return result
    if not a.run:
        ap.error("give a run folder (runs/<name>), --project NAME, --packages or --check")
    timing = {}
    result = execute_run(a.run, a.k, a.timeout, a.jobs, not a.no_cache, timing, a.sources)
    print_summary(result, timing)
    if a.merge:
        merge_metrics(a.run, result)
    return result


if __name__ == "__main__":
    data.cli(main)
