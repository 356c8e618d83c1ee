"""The native build cache under attack: a library planted (with a matching .sha256) in a directory
someone else can write is never loaded; a foreign, symlinked, truncated or corrupt cached library
is rebuilt; a compiler that never returns is stopped, with everything it started.

Builds here use a stand-in compiler that copies the genuine library (built once by the real
compiler) to its -o argument, so that every case runs the cache's logic in milliseconds. The planted
library's constructor writes a marker file: the marker exists if and only if its code ran here.
"""

import ctypes
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handgrad import engines, models, native_cache, train
from handgrad.engines import native as fast
from handgrad.models import ModelConfig

pytestmark = pytest.mark.skipif(not fast.have_compiler(), reason="no C++ compiler: the fast path cannot be built")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
NOBODY = 65534
SRC = str(Path(__file__).resolve().parents[1] / "src")

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {  /* runs as soon as the library is loaded */
    const char* path = getenv("HG_PLANTED_MARKER");
    FILE* f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("the planted code ran\n", f); fclose(f); }
}
int hg_abi_version(void) { return %d; }  /* everything the ABI check asks for */
long hg_workspace_bytes(void* dims) { return 0; }
long hg_steps(void) { return 0; }
"""


def _compile_c(tmp: Path, name: str, code: str) -> Path:
    src, out = tmp / f"{name}.c", tmp / f"{name}.so"
    src.write_text(code)
    subprocess.run([native_cache.compiler(), "-x", "c", "-shared", "-fPIC", "-o", str(out), str(src)], check=True,
                   timeout=120)
    return out


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """The genuine step library (a copy), a planted forgery of it, one that reports another ABI
    version, and a copy of libm: a valid shared library that is not ours."""
    tmp = tmp_path_factory.mktemp("libs")
    genuine = tmp / "genuine.so"
    genuine.write_bytes(fast.build().read_bytes())  # the default cache (built once for the whole suite)
    libm = tmp / "libm.so"
    ctypes.CDLL("libm.so.6")  # mapped now: its path is in /proc/self/maps
    found = [w for w in Path("/proc/self/maps").read_text().split() if Path(w).name.startswith("libm.so")]
    if not found:
        pytest.skip("libm is not mapped in this process")
    libm.write_bytes(Path(found[0]).read_bytes())
    return {"genuine": genuine, "planted": _compile_c(tmp, "planted", PLANTED_C % fast.ABI_VERSION),
            "abi99": _compile_c(tmp, "abi99", "int hg_abi_version(void) { return 99; }\n"
                                "long hg_workspace_bytes(void* d) { return 0; }\nlong hg_steps(void) { return 0; }\n"),
            "libm": libm, "program": fast.build(source=fast.PROGRAM_SOURCE)}


@pytest.fixture
def cc(tmp_path, libs, monkeypatch):
    """HANDGRAD_CC = a stand-in compiler that copies the genuine library to -o and logs each call;
    returns (the log, the library's name in any cache)."""
    log = tmp_path / "cc.log"
    script = tmp_path / "cc.sh"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "$TMPDIR" >> {log}.tmpdir\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                      f'cp {libs["genuine"]} "$out"\n')
    script.chmod(0o755)
    monkeypatch.setenv("HANDGRAD_CC", str(script))
    monkeypatch.setenv("HG_PLANTED_MARKER", str(tmp_path / "planted-code-ran"))
    monkeypatch.delenv("HANDGRAD_BUILD_TIMEOUT", raising=False)
    private = tmp_path / "name-probe"
    monkeypatch.setenv("HANDGRAD_CACHE", str(private))
    name = fast.build().name  # the name the key gives the step library with this compiler
    log.unlink()
    return log, name


def _builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _plant(directory: Path, name: str, data: bytes, mode: int = 0o755, digest_of: bytes | None = None) -> Path:
    """A library and a .sha256 that matches it (or `digest_of`), as an attacker writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    lib = directory / name
    lib.write_bytes(data)
    lib.chmod(mode)
    (directory / f"{name}.sha256").write_text(hashlib.sha256(data if digest_of is None else digest_of).hexdigest())
    return lib


def _load():
    fast._reset_for_tests()
    try:
        return fast.load_library()
    finally:
        fast._reset_for_tests()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "handgrad.native_cache" and r.levelno >= logging.WARNING]


def fast_mlp():
    return models.build(ModelConfig(n_hidden=16), 0)


def _chown(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)


# ---------------------------------------------------------------------------- directories someone else can write
ME = None  # the owner of what the test makes, unless a layout says NOBODY
# case: (the directories to make, in order: (path, mode or "->" symlink target, owner), the environment
# (None: unset), the directory the configuration resolves to (where the attacker plants), why it is refused)
REFUSED = {
    "world-writable": ([("shared", 0o777, ME)], {"HANDGRAD_CACHE": "shared"}, "shared",
                       "shared is writable by its group and others (mode 0777)"),
    "group-writable": ([("team", 0o775, ME)], {"HANDGRAD_CACHE": "team"}, "team",
                       "team is writable by its group (mode 0775)"),
    # not sticky: anyone may rename the cache away and put theirs in its place
    "above-world-writable": ([("scratch", 0o777, ME), ("scratch/mine", 0o700, ME)],
                             {"HANDGRAD_CACHE": "scratch/mine"}, "scratch/mine",
                             "scratch is writable by its group and others and not sticky (mode 0777), above the build cache"),
    "symlink-to-world-writable": ([("shared", 0o777, ME), ("link", "->shared", ME)], {"HANDGRAD_CACHE": "link"},
                                  "shared", "shared is writable by its group and others (mode 0777)"),
    "XDG_CACHE_HOME-in-world-writable": ([("xdg", 0o777, ME), ("xdg/handgrad", 0o700, ME)],
                                         {"HANDGRAD_CACHE": None, "XDG_CACHE_HOME": "xdg"}, "xdg/handgrad",
                                         "xdg is writable by its group and others and not sticky"),
    "owned-by-nobody": ([("theirs", 0o755, NOBODY)], {"HANDGRAD_CACHE": "theirs"}, "theirs",
                        f"theirs is owned by nobody, uid {NOBODY}, not by you"),
    "above-owned-by-nobody": ([("their-home", 0o755, NOBODY), ("their-home/cache", 0o700, ME)],
                              {"HANDGRAD_CACHE": "their-home/cache"}, "their-home/cache",
                              f"their-home is owned by nobody, uid {NOBODY}, not by you or root"),
    # as /tmp: fine above a cache, but this cache was made there by someone else
    "sticky-dir-cache-made-by-nobody": ([("tmp", 0o1777, ME), ("tmp/handgrad-cache", 0o755, NOBODY)],
                                        {"HANDGRAD_CACHE": "tmp/handgrad-cache"}, "tmp/handgrad-cache",
                                        f"handgrad-cache is owned by nobody, uid {NOBODY}, not by you"),
}


def _make(tmp: Path, layout) -> None:
    for path, mode, owner in layout:
        if isinstance(mode, str):
            (tmp / path).symlink_to(tmp / mode.removeprefix("->"))
            continue
        (tmp / path).mkdir()
        (tmp / path).chmod(mode)
        if owner is not None:
            _chown(tmp / path, owner)


def _apply(tmp: Path, env: dict, monkeypatch) -> None:
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, str(tmp / v))


def _cases(table: dict) -> list:
    return [pytest.param(*case, id=name, marks=[as_root] if any(o == NOBODY for _, _, o in case[0]) else [])
            for name, case in table.items()]


@pytest.mark.parametrize("layout, env, resolved, why", _cases(REFUSED))
def test_a_library_planted_in_a_cache_others_can_write_never_runs(layout, env, resolved, why, tmp_path, libs, cc,
                                                                   monkeypatch, caplog):
    log, name = cc
    _make(tmp_path, layout)
    _apply(tmp_path, env, monkeypatch)
    planted_dir = tmp_path / resolved
    _plant(planted_dir, name, libs["planted"].read_bytes())
    before = sorted(p.name for p in planted_dir.iterdir())
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the private build goes
    caplog.set_level(logging.WARNING)
    lib = _load()
    assert not (tmp_path / "planted-code-ran").exists(), "the planted library was loaded"
    assert lib.hg_abi_version() == fast.ABI_VERSION and _builds(log) == 1  # built privately, then loaded
    [warning] = _warnings(caplog)
    assert why in warning and "private temporary directory" in warning and "\n" not in warning
    assert sorted(p.name for p in planted_dir.iterdir()) == before  # nothing written where others can write
    assert not list(tmp_path.glob("handgrad-build-*"))  # the private directory is removed once loaded


def test_a_refused_cache_and_a_refused_temporary_directory_fall_back_in_one_line(tmp_path, libs, cc, monkeypatch):
    log, name = cc
    shared = tmp_path / "shared"
    _plant(shared, name, libs["planted"].read_bytes())
    shared.chmod(0o777)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    tmpdir.chmod(0o777)
    monkeypatch.setenv("HANDGRAD_CACHE", str(shared))
    monkeypatch.setattr("tempfile.tempdir", str(tmpdir))
    fast._reset_for_tests()
    try:
        steps = engines.native_steps(fast_mlp(), train.TrainConfig())
        fn, reason = (None, steps) if isinstance(steps, str) else (steps, "")
    finally:
        fast._reset_for_tests()
    assert not (tmp_path / "planted-code-ran").exists()
    assert fn is None and "\n" not in reason and _builds(log) == 0
    assert "shared is writable by its group and others" in reason and "tmpdir is writable by its group and others" in reason


# ---------------------------------------------------------------------------- directories that are fine
def test_a_private_cache_in_a_sticky_directory_is_used_as_it_is(tmp_path, libs, cc, monkeypatch, caplog):
    """/tmp-like parents (world-writable but sticky) and a symlink to a private directory are fine:
    the cached library is loaded without a rebuild or a warning."""
    log, name = cc
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    real = sticky / "cache"
    _plant(real, name, libs["genuine"].read_bytes())
    real.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("HANDGRAD_CACHE", str(link))
    caplog.set_level(logging.WARNING)
    assert _load().hg_abi_version() == fast.ABI_VERSION
    assert _builds(log) == 0 and _warnings(caplog) == []


def test_a_new_cache_is_created_private_whatever_the_umask(tmp_path, cc, monkeypatch):
    log, name = cc
    cache = tmp_path / "new" / "deeper" / "cache"
    monkeypatch.setenv("HANDGRAD_CACHE", str(cache))
    old = os.umask(0o002)
    try:
        assert fast.build().parent == cache and _builds(log) == 1
    finally:
        os.umask(old)
    for d in (tmp_path / "new", tmp_path / "new" / "deeper", cache):
        assert d.stat().st_mode & 0o777 == 0o700
    assert not (cache / name).stat().st_mode & 0o022


def test_the_compilers_temporary_files_stay_out_of_a_shared_tmpdir(tmp_path, cc, monkeypatch):
    """The compiler writes its assembly to TMPDIR for the assembler to read: in a directory others
    can write, that file could be swapped. It gets a private directory inside the cache instead."""
    log, name = cc
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TMPDIR", str(shared))
    cache = tmp_path / "cache"
    monkeypatch.setenv("HANDGRAD_CACHE", str(cache))
    assert fast.build() == cache / name
    [used] = Path(f"{log}.tmpdir").read_text().splitlines()[-1:]
    assert Path(used).parent == cache and not Path(used).exists()  # private, and removed after the build
    assert sorted(p.name for p in cache.iterdir()) == [name, f"{name}.sha256"]


# ---------------------------------------------------------------------------- files in a private cache
# each makes the cache `d` hold a planted `name`; returns a file outside it that must stay as it is, or None
def _lib_writable_by_others(d, name, libs):
    _plant(d, name, libs["planted"].read_bytes(), mode=0o777)


def _digest_writable_by_others(d, name, libs):
    _plant(d, name, libs["planted"].read_bytes())
    (d / f"{name}.sha256").chmod(0o666)


def _lib_owned_by_another_user(d, name, libs):
    _chown(_plant(d, name, libs["planted"].read_bytes()), NOBODY)


def _symlink_to_a_planted_lib(d, name, libs):
    elsewhere = d.parent / "elsewhere.so"
    elsewhere.write_bytes(libs["planted"].read_bytes())
    d.mkdir(mode=0o700)
    (d / name).symlink_to(elsewhere)
    (d / f"{name}.sha256").write_text(hashlib.sha256(elsewhere.read_bytes()).hexdigest())
    return elsewhere


FILES = [pytest.param(_lib_writable_by_others, id="library-writable-by-others"),
         pytest.param(_digest_writable_by_others, id="digest-writable-by-others"),
         pytest.param(_lib_owned_by_another_user, id="library-owned-by-nobody", marks=as_root),
         pytest.param(_symlink_to_a_planted_lib, id="symlink-to-a-planted-library")]


@pytest.mark.parametrize("setup", FILES)
def test_a_cached_file_others_could_write_is_rebuilt_not_loaded(setup, tmp_path, libs, cc, monkeypatch, caplog):
    log, name = cc
    cache = tmp_path / "cache"
    outside = setup(cache, name, libs)
    outside_bytes = outside.read_bytes() if outside else b""
    monkeypatch.setenv("HANDGRAD_CACHE", str(cache))
    caplog.set_level(logging.WARNING)
    assert _load().hg_abi_version() == fast.ABI_VERSION
    assert not (tmp_path / "planted-code-ran").exists(), "the planted library was loaded"
    assert _builds(log) == 1 and not native_cache.cached_problem(cache / name)
    assert not (cache / name).is_symlink()  # the link itself replaced, never written through:
    assert outside is None or outside.read_bytes() == outside_bytes
    [warning] = _warnings(caplog)
    assert "rebuilding" in warning and "\n" not in warning


# ---------------------------------------------------------------------------- foreign and corrupt libraries
def _foreign(kind, libs, d, name):
    if kind == "libm":
        _plant(d, name, libs["libm"].read_bytes())
    elif kind == "other-handgrad-library":
        _plant(d, name, libs["program"].read_bytes())
    elif kind == "another-abi-version":
        _plant(d, name, libs["abi99"].read_bytes())
    elif kind == "symlink-to-libm":
        d.mkdir(mode=0o700)
        (d / name).symlink_to(libs["libm"])
        (d / f"{name}.sha256").write_text(hashlib.sha256(libs["libm"].read_bytes()).hexdigest())
    elif kind == "garbage":
        _plant(d, name, random.Random(0).randbytes(50_000))
    elif kind == "elf-garbage":  # the genuine ELF header, then noise
        _plant(d, name, libs["genuine"].read_bytes()[:64] + random.Random(1).randbytes(50_000))


@pytest.mark.parametrize("kind", ["libm", "symlink-to-libm", "other-handgrad-library", "another-abi-version",
                                  "garbage", "elf-garbage"])
def test_a_cached_library_that_fails_its_checks_is_rebuilt_and_the_fast_engine_runs(kind, tmp_path, libs, cc,
                                                                                   monkeypatch, caplog):
    """A valid foreign library, a symlink to one, another ABI, or corrupt bytes, each with a matching
    .sha256: treated as absent, rebuilt, and the fast engine is used with no fallback warning."""
    log, name = cc
    cache = tmp_path / "cache"
    _foreign(kind, libs, cache, name)
    libm_bytes = libs["libm"].read_bytes()
    monkeypatch.setenv("HANDGRAD_CACHE", str(cache))
    caplog.set_level(logging.WARNING)
    fast._reset_for_tests()
    try:
        plan = engines.plan(fast_mlp(), train.TrainConfig())
    finally:
        fast._reset_for_tests()
    assert plan.name == "fast" and plan.warning == ""
    assert _builds(log) == 1 and not native_cache.cached_problem(cache / name) and not (cache / name).is_symlink()
    assert libs["libm"].read_bytes() == libm_bytes
    [rebuilt] = _warnings(caplog)
    assert "rebuilding" in rebuilt and "\n" not in rebuilt


PROBE = """
import json, sys, time
from handgrad.engines import native as fast
t0 = time.monotonic()
try:
    out = {"abi": fast.load_library().hg_abi_version()}
except fast.FastUnavailable as e:
    out = {"reason": str(e)}
except KeyboardInterrupt:
    out = {"interrupted": True}
out["seconds"] = time.monotonic() - t0
print(json.dumps(out))
"""


def _probe(env: dict, timeout: float = 60, interrupt_when: Path | None = None) -> dict:
    """Load the step library in a new process (a crash there must not take pytest with it)."""
    proc = subprocess.Popen([sys.executable, "-c", PROBE], env={**os.environ, "PYTHONPATH": SRC, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if interrupt_when is not None:
        t0 = time.monotonic()
        while not interrupt_when.exists() and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"loading the library took more than {timeout} s")
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_a_truncated_library_with_a_matching_digest_is_rebuilt_not_a_crash(tmp_path, libs, cc):
    """dlopen of a truncated ELF file maps pages past its end: SIGBUS. The ELF check catches it."""
    log, name = cc
    cache = tmp_path / "cache"
    _plant(cache, name, libs["genuine"].read_bytes()[:5000])
    assert _probe({"HANDGRAD_CACHE": str(cache)})["abi"] == fast.ABI_VERSION
    assert _builds(log) == 1 and not native_cache.cached_problem(cache / name)


# ---------------------------------------------------------------------------- a compiler that never returns
def _hanging_cc(tmp_path: Path) -> tuple[Path, Path]:
    """A compiler that starts a child of its own and waits for it for ever; (script, the child's pid file)."""
    pidfile, script = tmp_path / "child.pid", tmp_path / "hang.sh"
    script.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {pidfile}\nwait\n")
    script.chmod(0o755)
    return script, pidfile


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie is dead (in a container nobody may reap it)


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    t0 = time.monotonic()
    while not _gone(pid) and time.monotonic() - t0 < seconds:
        time.sleep(0.05)
    return _gone(pid)


def test_a_compiler_that_never_returns_is_stopped_at_the_limit_with_its_children(tmp_path):
    script, pidfile = _hanging_cc(tmp_path)
    out = _probe({"HANDGRAD_CC": str(script), "HANDGRAD_CACHE": str(tmp_path / "cache"),
                  "HANDGRAD_BUILD_TIMEOUT": "1"}, timeout=30)
    assert out["seconds"] < 10 and "did not finish within 1 s" in out["reason"] and "HANDGRAD_BUILD_TIMEOUT" in out["reason"]
    assert _wait_gone(int(pidfile.read_text())), "the compiler's child outlived the build"


def test_ctrl_c_during_a_build_kills_the_compilers_process_group(tmp_path):
    script, pidfile = _hanging_cc(tmp_path)
    out = _probe({"HANDGRAD_CC": str(script), "HANDGRAD_CACHE": str(tmp_path / "cache")}, timeout=60,
                 interrupt_when=pidfile)
    assert out.get("interrupted") and out["seconds"] < 30
    assert _wait_gone(int(pidfile.read_text())), "the compiler's child outlived the interrupted build"


def test_the_default_build_limit_fits_a_build_not_minutes():
    # a cold build of program.cpp took 26 s on a loaded 2-core machine; two minutes held a run too long
    assert 30 <= native_cache.BUILD_TIMEOUT_S <= 90


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_a_bad_build_limit_is_named_in_the_fallback_reason(value, tmp_path, cc, monkeypatch):
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HANDGRAD_BUILD_TIMEOUT", value)
    fast._reset_for_tests()
    try:
        steps = engines.native_steps(fast_mlp(), train.TrainConfig())
        fn, reason = (None, steps) if isinstance(steps, str) else (steps, "")
    finally:
        fast._reset_for_tests()
    assert fn is None and f"HANDGRAD_BUILD_TIMEOUT={value!r}" in reason and "\n" not in reason
