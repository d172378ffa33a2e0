"""The 13 languages: source file, build/run steps, memory enforcement, pre-warm bootstraps.

Compiled languages build into the run's private temporary directory (outside the working directory),
so the only by-product that can appear next to the user's files is none at all; ``byproducts`` lists
what KubeCodeRun's runners leave behind (``Code.class``) so it is never reported either way.

Memory per language (``mem`` = ``--max-memory-mb``), all on top of the wall-clock and CPU limits:

=============  ===============================================  ======================================
language       run step                                         why
=============  ===============================================  ======================================
py php r c     RLIMIT_AS = mem                                  plain malloc users
cpp rs f90 d   RLIMIT_AS = mem
bash
js ts          ``--max-old-space-size=mem``, AS = mem + 1 GiB   V8 reserves ~0.7 GiB of address space
java           ``-Xmx`` = 3/4 mem, AS = mem + 1.5 GiB           JVM reserves code cache, class space,
                                                                thread stacks up front
go             ``GOMEMLIMIT`` = mem, AS = mem + 1 GiB           the runtime reserves ~0.6 GiB at start
compile steps  AS = max(4 × mem, 4 GiB), more processes         compilers are trusted and threaded
=============  ===============================================  ======================================
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from .limits import SAFE_PATH

ALIASES = {
    "python": "py",
    "javascript": "js",
    "typescript": "ts",
    "rust": "rs",
    "fortran": "f90",
    "dlang": "d",
    "sh": "bash",
}

# --- pre-warm bootstraps ------------------------------------------------------------------------
# Protocol on an inherited socket (one end of a socketpair; its fd number is an argument, "-" for a
# cold run): the child writes b"R" once its interpreter is up (and pre-imports are done), then
# blocks reading; the sidecar writes the source file and sends b"G", and the child runs the file
# exactly as ``<interpreter> <file>`` would.

PY_BOOT = r"""
def _kcr_boot():
    import os, sys
    for _m in sys.argv[2].split(","):
        if _m.strip():
            try:
                __import__(_m.strip())
            except Exception:
                pass
    # Everything that does not depend on the program is done before the handshake.
    path = sys.argv[1]
    cwd = os.getcwd()
    full = os.path.join(cwd, path)
    import __main__
    g = __main__.__dict__
    if sys.argv[3] != "-":
        fd = int(sys.argv[3])
        # Pay first-use costs now: the first compile() initialises the compiler (~0.7 ms).
        compile(b"pass\n", "<warm-up>", "exec")
        import atexit
        os.set_inheritable(fd, False)  # kept for the "done" report; the program's children never see it
        os.write(fd, b"R")
        if os.read(fd, 1) != b"G":  # the sidecar went away: never run a stale file
            os._exit(1)
    else:
        fd = None
    sys.argv[:] = [path] + sys.argv[4:]  # the program's own args follow the bootstrap's three
    sys.path[0] = cwd if os.access(cwd, os.R_OK | os.X_OK) else ""
    with open(path, "rb") as fh:
        src = fh.read()
    builtins = g["__builtins__"]
    g.clear()
    g.update(__name__="__main__", __doc__=None, __package__=None, __loader__=None, __spec__=None,
             __file__=full, __cached__=None, __builtins__=builtins)
    status = 0
    try:
        exec(compile(src, full, "exec"), g)
    except SystemExit as exc:
        if exc.code is None:
            status = 0
        elif isinstance(exc.code, int):
            status = exc.code & 0xFF
        else:
            try:
                print(exc.code, file=sys.stderr)
            except Exception:
                pass
            status = 1
    except BaseException as exc:
        tb = exc.__traceback__
        sys.excepthook(type(exc), exc.with_traceback(tb.tb_next if tb else None), tb.tb_next if tb else None)
        status = 1
    # The interpreter's own finalisation, minus module teardown (which costs more than the run):
    # join non-daemon threads, run atexit handlers, drop the program's globals (files left open
    # are flushed and closed by refcounting), then, only if files are still open, flush every
    # buffered writer (those reachable only through cycles or other modules' globals, which module
    # teardown would have flushed), and finally the standard streams.
    threading = sys.modules.get("threading")  # only if the program used it: importing costs ms
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:
            pass
    try:
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        pass
    try:
        g.clear()
        # One fd is the listing's own (and the handshake socket ours); any other beyond stdio
        # may hold unflushed data.
        if sum(1 for f in os.listdir("/proc/self/fd") if int(f) > 2 and int(f) != fd) > 1:
            import gc, io
            kinds = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)
            for obj in gc.get_objects():
                if type(obj) in kinds:
                    try:
                        obj.flush()
                    except BaseException:
                        pass
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    if fd is not None:
        # Report "done" before the kernel tears the process down (~1 ms for an interpreter): the
        # output is complete once stdout/stderr are closed, so the sidecar can answer at once.
        try:
            os.close(1)
            os.close(2)
            os.write(fd, b"D" + bytes([status & 0xFF]))
            # The kernel wakes the sidecar on this CPU (a socket write is a "sync" wakeup: the
            # writer is expected to sleep next), but we go on to exit, and tearing an interpreter
            # down takes ~0.5 ms: the sidecar would read the report only after it. Let it run first.
            os.sched_yield()
        except OSError:
            pass
    os._exit(status)
_kcr_boot()
"""

# argv after `node -e NODE_BOOT --`: <js|ts> <handshake fd or -> <file>
NODE_BOOT = r"""
const fs = require('fs'), path = require('path'), Module = require('module');
const [mode, fdArg, file, ...userArgs] = process.argv.slice(1);
if (mode === 'ts') {
  const ts = require('typescript');
  Module._extensions['.ts'] = function (m, filename) {
    const src = fs.readFileSync(filename, 'utf8');
    const out = ts.transpileModule(src, { fileName: path.basename(filename), reportDiagnostics: true,
      compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2020,
                         esModuleInterop: true, sourceMap: false } });
    if (out.diagnostics && out.diagnostics.length) {
      for (const d of out.diagnostics) {
        const msg = ts.flattenDiagnosticMessageText(d.messageText, '\n');
        let where = path.basename(filename);
        if (d.file && d.start !== undefined) {
          const p = d.file.getLineAndCharacterOfPosition(d.start);
          where += `(${p.line + 1},${p.character + 1})`;
        }
        process.stderr.write(`${where}: error TS${d.code}: ${msg}\n`);
      }
      process.exit(1);
    }
    m._compile(out.outputText, filename);
  };
}
if (fdArg !== '-') {
  const fd = Number(fdArg);
  // Pay Node's lazy initialisation now: the stdio streams, the CommonJS compile path.
  process.stdout; process.stderr;
  new Module('[warm-up]', null)._compile('module.exports = 1;', path.join(process.cwd(), '[warm-up].js'));
  if (mode === 'ts') Module._extensions['.ts'].warm = require('typescript').transpileModule(
    'const a: number = 1; export default a;', { compilerOptions: { module: 1 } });  // JIT warm-up
  fs.writeSync(fd, 'R');
  const go = Buffer.alloc(1);
  let n = 0;
  try { n = fs.readSync(fd, go, 0, 1, null); } catch (e) {}
  if (n !== 1 || go[0] !== 0x47) process.exit(1);  // not "G": the sidecar went away
  // "Done" report, as pre-warmed Python sends it: once every 'exit' listener has run (the
  // program's own included, in whatever order they were added), the status is final and the
  // output complete (Node writes to pipes synchronously). Point stdout/stderr at /dev/null, send
  // "D" + status, and end at once: the sidecar answers without waiting for Node's teardown
  // (~5 ms, even for a SIGKILL: the kernel unmaps V8's large reservations).
  // An uncaught exception emits 'exit' before Node prints it: then no report (the exit tells).
  let fatal = false;
  process.on('uncaughtExceptionMonitor', () => { fatal = true; });
  const emit = process.emit;
  process.emit = function (event, ...rest) {
    const result = emit.call(this, event, ...rest);
    if (event === 'exit' && !fatal) {
      const code = Number(process.exitCode !== undefined ? process.exitCode : rest[0]) || 0;
      try {
        for (const stdio of [1, 2]) { fs.closeSync(stdio); fs.openSync('/dev/null', 'w'); }
        fs.writeSync(fd, Buffer.from([0x44, code & 0xff]));
        // Give the sidecar 1 ms to answer before dying: the kernel woke it on this CPU (a socket
        // write is a "sync" wakeup), where tearing V8 down (ms) would otherwise run first.
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1);
      } catch (e) {}
      process.kill(process.pid, 'SIGKILL');
    }
    return result;
  };
}
const full = path.resolve(file);
process.argv = [process.argv[0], full, ...userArgs];
Module._load(full, null, true);  // as `node file` does for CommonJS, minus the ESM loader set-up
"""

# argv after `bash -c BASH_BOOT bash`: <handshake fd> <file>
# After the handshake the fd stays open for the "done" report, sent by an EXIT trap (as pre-warmed
# Python does): the status, once stdout and stderr are closed. A program that replaces the trap,
# execs or is killed sends none; then the process's exit tells. After the report the trap waits
# (at most 2 ms) for the sidecar to close its end, which it does once it has answered: the
# kernel woke the sidecar on this CPU, where the shell's exit would otherwise run first.
BASH_BOOT = r"""printf R >&"$1"; IFS= read -r -n1 -u "$1" _kcr && [ "$_kcr" = G ] || exit 1; _kcr=$1; trap '_kcr_s=$?; exec 1>&- 2>&-; printf -v _kcr_s "\\%03o" "$_kcr_s"; printf "D$_kcr_s" >&"$_kcr"; read -r -t 0.002 -n1 -u "$_kcr" _kcr_s' EXIT; BASH_ARGV0="$2"; shift 2; . "./$BASH_ARGV0"
"""


@dataclass(frozen=True, slots=True)
class Step:
    """One process of a run: a compile step (trusted tool, generous limits) or the program."""

    argv: list[str]
    compile: bool = False
    env: dict[str, str] = field(default_factory=dict)
    address_space_mb: int | None = None  # None: the run's default (mem)


@dataclass(frozen=True, slots=True)
class Context:
    """What steps need to know about this run and this machine."""

    tmp: str  # private temp dir of this run (outside the working dir)
    memory_mb: int
    tools: Toolchain
    node_snapshot: str | None = None  # pre-warmed js: a start-up snapshot blob (node_snapshot.py)


class Toolchain:
    """Absolute paths of the tools, resolved once at start-up on the fixed PATH users get."""

    def __init__(self, python: str | None = None, node_path: str | None = None) -> None:
        self.python = python or shutil.which("python3", path=SAFE_PATH) or "python3"
        self.node_path = node_path or "/usr/local/lib/node_modules:/usr/lib/node_modules"
        self._cache: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if name not in self._cache:
            self._cache[name] = shutil.which(name, path=SAFE_PATH) or name
        return self._cache[name]

    def has(self, name: str) -> bool:
        return shutil.which(name, path=SAFE_PATH) is not None


def _compile_as(mem: int) -> int:
    return max(4 * mem, 4096)


def _py(c: Context) -> list[Step]:
    # The same bootstrap as the pre-warmed path (without the wait), so both behave identically
    # and neither needs the working directory's absolute path to be reachable.
    return [Step([c.tools.python, "-c", PY_BOOT, "code.py", "", "-"], env={"PYTHONUNBUFFERED": "1"})]


def node_flags(memory_mb: int) -> list[str]:
    """Node's flags for a run: the heap cap (a snapshot must be built with exactly these)."""
    return [f"--max-old-space-size={memory_mb}"]


def _node_env(c: Context) -> dict[str, str]:
    return {"NODE_PATH": c.tools.node_path}


def _js(c: Context) -> list[Step]:
    return [Step([c.tools("node"), f"--max-old-space-size={c.memory_mb}", "code.js"],
                 env=_node_env(c), address_space_mb=c.memory_mb + 1024)]


def _ts(c: Context) -> list[Step]:
    argv = [c.tools("node"), f"--max-old-space-size={c.memory_mb}", "-e", NODE_BOOT, "--",
            "ts", "-", "code.ts"]
    return [Step(argv, env=_node_env(c), address_space_mb=c.memory_mb + 1024)]


def _go(c: Context) -> list[Step]:
    env = {"GOCACHE": f"{c.tmp}/gocache", "GOPATH": f"{c.tmp}/gopath", "GOPROXY": "off",
           "GOSUMDB": "off", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0", "GOTOOLCHAIN": "local"}
    out = f"{c.tmp}/main"
    return [
        Step([c.tools("go"), "build", "-o", out, "main.go"], compile=True, env=env,
             address_space_mb=_compile_as(c.memory_mb)),
        Step([out], env={"GOMEMLIMIT": f"{c.memory_mb}MiB"}, address_space_mb=c.memory_mb + 1024),
    ]


def _jvm_flags(heap_mb: int) -> list[str]:
    return [f"-Xmx{heap_mb}m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-XX:CompressedClassSpaceSize=64m", "-XX:ReservedCodeCacheSize=64m", "-Xss1m",
            "-Xshare:auto"]


def _java(c: Context) -> list[Step]:
    classes = f"{c.tmp}/classes"
    javac = [c.tools("javac")] + [f"-J{f}" for f in _jvm_flags(max(256, c.memory_mb))]
    heap = max(16, c.memory_mb * 3 // 4)
    return [
        Step(javac + ["-encoding", "UTF-8", "-d", classes, "Code.java"], compile=True,
             address_space_mb=_compile_as(c.memory_mb) + 1536),
        Step([c.tools("java")] + _jvm_flags(heap) + ["-cp", f"{classes}:.", "Code"],
             address_space_mb=c.memory_mb + 1536),
    ]


def _native(compiler: str, source: str, extra: list[str]) -> Callable[[Context], list[Step]]:
    def steps(c: Context) -> list[Step]:
        out = f"{c.tmp}/prog"
        return [
            Step([c.tools(compiler), source, "-o", out, *extra], compile=True,
                 address_space_mb=_compile_as(c.memory_mb)),
            Step([out]),
        ]

    return steps


def _rs(c: Context) -> list[Step]:
    out = f"{c.tmp}/prog"
    return [
        Step([c.tools("rustc"), "--edition", "2021", "-C", "debuginfo=0", "main.rs", "-o", out],
             compile=True, address_space_mb=_compile_as(c.memory_mb)),
        Step([out]),
    ]


def _d(c: Context) -> list[Step]:
    out = f"{c.tmp}/prog"
    if c.tools.has("ldc2"):
        build = [c.tools("ldc2"), "code.d", f"-of={out}", f"-od={c.tmp}/obj"]
    else:
        build = [c.tools("gdc"), "code.d", "-o", out]
    return [Step(build, compile=True, address_space_mb=_compile_as(c.memory_mb)), Step([out])]


@dataclass(frozen=True, slots=True)
class LanguageSpec:
    code: str
    source_file: str
    steps: Callable[[Context], list[Step]]
    prewarm: str | None = None  # "py" | "js" | "ts" | "bash"
    byproducts: frozenset[str] = frozenset()


LANGUAGES: dict[str, LanguageSpec] = {
    s.code: s
    for s in (
        LanguageSpec("py", "code.py", _py, prewarm="py"),
        LanguageSpec("js", "code.js", _js, prewarm="js"),
        LanguageSpec("ts", "code.ts", _ts, prewarm="ts"),
        LanguageSpec("go", "main.go", _go),
        LanguageSpec("java", "Code.java", _java, byproducts=frozenset({"Code.class"})),
        LanguageSpec("c", "code.c", _native("gcc", "code.c", ["-lm"])),
        LanguageSpec("cpp", "code.cpp", _native("g++", "code.cpp", [])),
        LanguageSpec("php", "code.php", lambda c: [Step([c.tools("php"), "code.php"])]),
        LanguageSpec("rs", "main.rs", _rs),
        LanguageSpec("r", "code.r", lambda c: [Step([c.tools("Rscript"), "code.r"])]),
        LanguageSpec("f90", "code.f90", _native("gfortran", "code.f90", [])),
        LanguageSpec("d", "code.d", _d),
        LanguageSpec("bash", "code.sh", lambda c: [Step([c.tools("bash"), "code.sh"])], prewarm="bash"),
    )
}

# Every runner source file, whatever the sidecar's language: never reported as generated.
SOURCE_FILES = frozenset(s.source_file for s in LANGUAGES.values())


def with_args(steps: list[Step], args: list[str]) -> list[Step]:
    """The steps with the program's ``args`` appended to the run step's argv (contract §4.3).

    Every run step ends with the program (``code.sh``, ``code.js``, the built binary, ``Code``...)
    or with the bootstrap's own trailing arguments (``PY_BOOT``, ``NODE_BOOT``, which pass what
    follows on to the program), so appending is all it takes; compile steps never see them.
    """
    if not args:
        return steps
    last = steps[-1]
    return [*steps[:-1], Step([*last.argv, *args], compile=last.compile, env=last.env,
                              address_space_mb=last.address_space_mb)]


def lookup(code: str) -> LanguageSpec | None:
    code = code.strip().lower()
    return LANGUAGES.get(ALIASES.get(code, code))


def prewarm_step(spec: LanguageSpec, c: Context, preimports: str, fd: int) -> Step | None:
    """The pre-warmed variant of the run step (same limits and env), or None."""
    if spec.prewarm == "py":
        return Step([c.tools.python, "-c", PY_BOOT, "code.py", preimports, str(fd)],
                    env={"PYTHONUNBUFFERED": "1"})
    if spec.prewarm == "js" and c.node_snapshot:  # the same NODE_BOOT, from a snapshot
        argv = [c.tools("node"), "--snapshot-blob", c.node_snapshot, *node_flags(c.memory_mb),
                spec.prewarm, str(fd), spec.source_file]
        return Step(argv, env=_node_env(c), address_space_mb=c.memory_mb + 1024)
    if spec.prewarm in ("js", "ts"):
        argv = [c.tools("node"), *node_flags(c.memory_mb), "-e", NODE_BOOT, "--",
                spec.prewarm, str(fd), spec.source_file]
        return Step(argv, env=_node_env(c), address_space_mb=c.memory_mb + 1024)
    if spec.prewarm == "bash":
        return Step([c.tools("bash"), "-c", BASH_BOOT, "bash", str(fd), "code.sh"])
    return None
