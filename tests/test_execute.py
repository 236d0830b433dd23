"""execute.py (issue 30, the execution harness) against its outside references, javac and JUnit:
on the fixture project tests/fixtures/exec_project (four classes, JUnit 5 tests and one JUnit 4
test, a helper in the test tree, a test resource), the references compile and pass, a wrong
candidate does not compile, a failing assertion fails, a passing test that never calls its focal
method is not focal_covered; and the sandbox contains System.exit, an infinite loop, a fork bomb,
writing and deleting a file outside it, a network connection and a memory hog, each costing that
one test only. Then a whole run folder end to end (execution.json, the summary's figures,
merge_metrics, the cache) and the "not run" path. Skipped, with the reason, where javac, the
test jars or the sandbox are missing (`make setup-java` installs them). 30-50 s on 2 busy cores.

    .venv/bin/python -m pytest -q tests/test_execute.py
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import data
import data.mine
import execute

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "exec_project"
# seconds a test may run before its sandbox is killed (the loop and the fork bomb use all of it)
TIMEOUT = 4
WORKERS = 2
PROBLEM = execute.java_problem() or execute.sandbox_problem()
needs_java = pytest.mark.skipif(PROBLEM is not None, reason=f"execution harness: {PROBLEM}")


def records():
    """The fixture project's pairs, mined the corpus's way (data.mine)."""
    return data.mine.mine(str(FIXTURE), "exec_project")[0]


def record(test_method):
    return next(r for r in records() if r["test_case"]["identifier"] == test_method)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private data/cache/exec/ for this module (under /tmp: the sandbox must bind it back)."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("exec-cache")
        mp.setattr(execute, "EXEC_CACHE", folder)
        yield folder


@pytest.fixture(scope="module")
def project(cache_dir):
    # not in execute.PROJECTS: its main sources are compiled (once) by the harness
    return execute.project_env("exec_project", FIXTURE, execute.helpers()[0])


@pytest.fixture(scope="module")
def victim():
    """A file outside the sandbox that anyone may write (0666 in a 0777 folder): only the
    sandbox's read-only view of the machine protects it."""
    parent = "/var/tmp" if os.path.isdir("/var/tmp") else str(execute.ROOT / "data" / "cache")
    folder = tempfile.mkdtemp(dir=parent, prefix="exec-victim-")
    os.chmod(folder, 0o777)
    path = Path(folder) / "victim.txt"
    path.write_text("untouched\n")
    os.chmod(path, 0o666)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def listener():
    """A TCP server on this machine's loopback: a sandboxed test must not reach it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    yield server
    server.close()


def candidates(victim, port, marker):
    """Candidate bodies for CalcTest.testAdd (focal method Calc.add), by case name, in the
    order they run in one JVM: each hostile one is followed by a good one that must pass."""
    files = "java.nio.file.Files"
    path = "java.nio.file.Path"
    bomb = '"sh", "-c", "f() { f | f & }; f; sleep 60"'
    # 64 arrays of 128 MiB, kept: far past the sandbox JVM's heap
    hog = "long[][] h = new long[64][]; for (int i = 0; i < 64; i++) { h[i] = new long[1 << 24]; }"
    cases = {
        "wrong": 'assertEquals(3, Calc.add(1, "2"));',
        "failing": "assertEquals(4, Calc.add(1, 2));",
        "no_focal": "assertEquals(2, 1 + 1);",
        "exit": "System.exit(0);",
        "loop": "while (true) { }",
        "fork": f"assertEquals(0, new ProcessBuilder({bomb}).start().waitFor());",
        "write_outside": f'{files}.writeString({path}.of("{victim}"), "overwritten");',
        "delete_outside": f'{files}.delete({path}.of("{victim}"));',
        "network": f'new java.net.Socket("127.0.0.1", {port}).close();',
        "memory": hog,
        "leftover": f'{files}.writeString({path}.of("{marker}"), "x"); '
        f'{files}.writeString({path}.of("/tmp/{marker}"), "x"); '
        "assertEquals(3, Calc.add(1, 2));",
    }
    out = {}
    for i, (name, body) in enumerate(cases.items()):
        out[name] = f"@Test public void testAdd() throws Exception {{ {body} }}"
        # the good test after it: it passes in whatever JVM the harness gives it
        out[f"after_{name}"] = (
            f"@Test public void testAdd() {{ /* {i} */ assertEquals(3, Calc.add(1, 2)); }}"
        )
    return out


@pytest.fixture(scope="module")
def outcomes(project, victim, listener):
    """Every fixture reference and every candidate run through the harness at once (as a run
    is), with the processes of the sandboxes' uids sampled throughout. -> (outcomes by name,
    the most processes one sandbox uid held, the uids' processes left afterwards, marker)."""
    marker = f"left-behind-{uuid.uuid4().hex}.txt"
    pair = execute.make_pair(project, record("testAdd"))
    jobs = {}
    for r in records():
        jobs[f"ref_{r['test_case']['identifier']}"] = execute.make_job(
            project, execute.make_pair(project, r), r["tgt"], TIMEOUT, kind="reference"
        )
    codes = candidates(victim, listener.getsockname()[1], marker)
    for name, code in codes.items():
        jobs[name] = execute.make_job(project, pair, code, TIMEOUT)
    uids = [execute.UID_BASE + slot for slot in range(WORKERS)]
    peak = [0]
    running = [True]

    def sample():
        while running[0]:
            for uid in uids:
                peak[0] = max(peak[0], len(execute.uid_processes(uid)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = execute.execute_jobs(project, list(jobs.values()), TIMEOUT, WORKERS, cache=False)
    finally:
        running[0] = False
        sampler.join()
    left = [pid for uid in uids for pid in execute.uid_processes(uid)]
    by_name = {name: results[job.key] for name, job in jobs.items()}
    return by_name, peak[0], left, marker


@needs_java
def test_references_compile_and_pass_junit5_and_junit4(outcomes):
    results = outcomes[0]
    refs = {n: r for n, r in results.items() if n.startswith("ref_")}
    # CalcTest (JUnit 5, a helper from the test tree), GreeterTest (JUnit 4), TextsTest (a
    # resource, a package-private member), CounterTest (a constructor as well)
    assert len(refs) == 6
    for name, result in refs.items():
        assert result["status"] == "passed", (name, result)
        assert result["focal_covered"] is True, (name, result)


@needs_java
def test_wrong_candidate_fails_to_compile_in_its_own_line(outcomes):
    result = outcomes[0]["wrong"]
    assert result["compiled"] is False
    assert result["status"] == "compile_error"
    assert result["reason"].startswith("in the candidate")
    assert "String" in result["reason"] or "incompatible" in result["reason"]


@needs_java
def test_failing_assertion_fails(outcomes):
    result = outcomes[0]["failing"]
    assert result["compiled"] is True
    assert result["passed"] is False
    assert "expected: <4> but was: <3>" in result["reason"]


@needs_java
def test_passing_test_without_its_focal_method_is_not_focal_covered(outcomes):
    result = outcomes[0]["no_focal"]
    assert result["passed"] is True
    assert result["focal_covered"] is False
    # the same class and method calling Calc.add is covered
    assert outcomes[0]["after_no_focal"]["focal_covered"] is True


@needs_java
@pytest.mark.parametrize("case", ["exit", "loop", "fork", "memory"])
def test_a_hostile_test_costs_only_itself(outcomes, case):
    result = outcomes[0][case]
    assert result["compiled"] is True
    assert result["passed"] is False
    # the fork bomb: killed at the timeout, or failed when its shell, or the JVM, could not fork
    want = {"exit": ["crashed"], "loop": ["timeout"], "fork": ["timeout", "failed"]}
    assert result["status"] in want.get(case, ["failed"]), result["reason"]
    if case == "memory":
        assert "OutOfMemoryError" in result["reason"]
    # the next test, in the same JVM or a fresh one, runs and passes
    assert outcomes[0][f"after_{case}"]["status"] == "passed"


@needs_java
def test_fork_bomb_is_held_to_the_process_limit_and_cleaned_up(outcomes):
    peak = outcomes[1]
    left = outcomes[2]
    # the bomb did fork (a JVM alone holds one process) and hit RLIMIT_NPROC
    assert 20 < peak <= execute.NPROC
    assert left == []


@needs_java
@pytest.mark.parametrize("case", ["write_outside", "delete_outside"])
def test_files_outside_the_sandbox_survive(outcomes, victim, case):
    result = outcomes[0][case]
    assert result["status"] == "failed"
    assert "Read-only file system" in result["reason"] or "FileSystemException" in result["reason"]
    assert victim.read_text() == "untouched\n"
    assert outcomes[0][f"after_{case}"]["status"] == "passed"


@needs_java
def test_network_is_cut_even_to_this_machine(outcomes, listener):
    result = outcomes[0]["network"]
    assert result["status"] == "failed"
    assert "ConnectException" in result["reason"]
    # nothing knocked on the server, which a test outside the sandbox reaches
    with pytest.raises(BlockingIOError):
        listener.accept()
    probe = socket.create_connection(listener.getsockname(), timeout=5)
    probe.close()


@needs_java
def test_working_folder_is_thrown_away(outcomes):
    result = outcomes[0]["leftover"]
    marker = outcomes[3]
    # writing inside the sandbox works, and leaves nothing behind
    assert result["status"] == "passed"
    for folder in (FIXTURE, Path("/tmp"), Path.cwd(), execute.ROOT):
        assert not (folder / marker).exists()


@needs_java
def test_cpu_time_limit_kills_a_busy_process():
    cmd = execute.sandbox_command(["sh", "-c", "while :; do :; done"], 0, [], {}, 1)
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, timeout=60)
    # SIGXCPU (or SIGKILL at the hard limit) well before the 60 s timeout
    assert done.returncode != 0
    assert time.monotonic() - start < 20


def test_method_name_and_missing_method():
    assert execute.method_name("@Test(expected = E.class) public void a(int x) { }") == "a"
    assert execute.method_name("@Test public void a() { } void b() { }") == "a"
    assert execute.method_name("") == ""
    assert execute.method_name("assertEquals(1, 2);") == ""


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="no dpkg: not a Debian machine")
def test_debian_jars_follow_dpkg():
    listed = subprocess.run(["dpkg", "-L", "libcommons-io-java"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("libcommons-io-java is not installed")
    jars, missing = execute.debian_jars(["libcommons-io-java", "no-such-package-here"])
    assert missing == ["no-such-package-here"]
    want = {os.path.realpath(p) for p in listed.stdout.split() if p.startswith("/usr/share/java/")}
    want = {p for p in want if p.endswith(".jar")}
    assert {os.path.realpath(j) for j in jars} == want


def write_run(folder, recs, fold, k_folds):
    """A run folder as train.py and evaluate.py leave it, with predictions chosen so that the
    figures are known: base's best beam is the reference itself, the customized model's only
    passing beam is its fifth, which never calls the focal method."""
    folder.mkdir()
    corpus = folder.parent / "exec_project.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = dict(project="exec_project", corpus=str(corpus), fold=fold, k_folds=k_folds, seed=0)
    (folder / "config.json").write_text(json.dumps(cfg))
    test = data.folds(recs, fold, k_folds, 0)[2]
    rows = []
    for r in test:
        name = r["test_case"]["identifier"]
        junk = f"@Test public void {name}() {{ undefinedCall(); }}"
        fails = f"@Test public void {name}() {{ org.junit.jupiter.api.Assertions.fail(); }}"
        trivial = f"@Test public void {name}() {{ }}"
        base = [r["tgt"], junk, junk, junk, junk]
        customized = [junk, "not java at all", fails, junk, trivial]
        rows.append({"id": r["id"], "reference": r["tgt"], "base": {"predictions": base}})
        rows[-1]["customized"] = {"predictions": customized}
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"base": {"bleu4": 1.0}, "customized": {"bleu4": 2.0}, "decoding": {}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return test


@needs_java
def test_run_folder_end_to_end(tmp_path, cache_dir):
    run = tmp_path / "exec_project-lldb-f0"
    test = write_run(run, records(), 0, 2)
    timing = {}
    summary = execute.execute_run(run, 5, TIMEOUT, WORKERS, True, timing, sources=FIXTURE)
    assert summary["harness_valid"] == 1.0
    assert summary["valid_pairs"] == len(test) == summary["pairs"]
    base = summary["models"]["base"]
    cust = summary["models"]["customized"]
    assert base == {
        "compile@1": 1.0,
        "compile@5": 1.0,
        "pass@1": 1.0,
        "pass@5": 1.0,
        "focal_covered@5": 1.0,
    }
    assert cust == {
        "compile@1": 0.0,
        "compile@5": 1.0,
        "pass@1": 0.0,
        "pass@5": 1.0,
        "focal_covered@5": 0.0,
    }
    report = json.loads((run / "execution.json").read_text())
    assert [p["id"] for p in report["pairs"]] == [r["id"] for r in test]
    statuses = [c["status"] for c in report["pairs"][0]["models"]["customized"]]
    assert statuses == ["compile_error", "no_method", "failed", "compile_error", "passed"]
    merged = execute.merge_metrics(run, summary)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == merged
    assert on_disk["base"]["bleu4"] == 1.0
    assert on_disk["customized"]["pass@5"] == 1.0
    assert on_disk["customized"]["harness_valid"] == 1.0
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]
    # again: every outcome comes from the cache
    again = {}
    assert execute.execute_run(run, 5, TIMEOUT, WORKERS, True, again, FIXTURE) == summary
    assert again["cached"] == again["unique"]


def test_without_a_jdk_the_figures_say_not_run(tmp_path, monkeypatch):
    run = tmp_path / "exec_project-lldb-f0"
    test = write_run(run, records(), 1, 2)
    monkeypatch.setattr(execute, "java_problem", lambda: "no javac on PATH")
    summary = execute.execute_run(run)
    assert summary["status"] == "not run: no javac on PATH"
    assert summary["harness_valid"] is None
    assert summary["pairs"] == len(test)
    assert summary["models"]["customized"]["pass@5"] is None
    assert not (run / "execution.json").exists()


def test_bad_run_folder_is_one_line(tmp_path):
    run = tmp_path / "empty-run"
    run.mkdir()
    cmd = [sys.executable, str(execute.ROOT / "execute.py")]
    done = subprocess.run(cmd + [str(run)], capture_output=True, text=True, cwd=execute.ROOT)
    assert done.returncode == 1
    assert done.stderr.strip() == f"{run}: no config.json: train it first (train.py)"
