"""What a learner's file does besides writing its gradients by hand, read from its source by the grader
itself (so the file cannot hide it by what it prints or sends): autograd (`loss.backward()`,
`torch.autograd.grad`, `requires_grad`, `.grad`, the grader's own autograd helper), handgrad's own code
(`from handgrad.dojo.exercises import ...`), and what reaches outside the gradients (files, processes,
the network, `exec`, frames and other interpreter internals). Each finding is a Flag on its line;
the grade shows it, and strict mode makes the rows it touches wrong. The child's watch (runner.Watch)
adds what it sees while the code runs (RUNTIME): it can only add flags, and the words are the grader's.

Rules are data (the tables below), read by one walk of the code the child runs: a region item's
region and the file's imports and definitions, a call item's module without its `__main__` part.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

KINDS = ("autograd", "handgrad", "outside")

# modules whose import or use is autograd, not a hand-written gradient
AUTOGRAD_MODULES = (
    "torch.autograd",
    "torch.func",
    "functorch",
    "torch.enable_grad",
    "torch.set_grad_enabled",
    "torch.inference_mode",
)
# attributes of any tensor that are autograd's (the base `self` is the learner's own object)
AUTOGRAD_ATTRS = {
    "backward": "calls .backward() (autograd)",
    "grad": "reads .grad (autograd's answer)",
    "grad_fn": "reads .grad_fn (autograd's graph)",
    "requires_grad": "uses requires_grad (autograd)",
    "requires_grad_": "calls requires_grad_() (autograd)",
    "retain_grad": "calls retain_grad() (autograd)",
    "register_hook": "registers an autograd hook",
}
# handgrad's names a dojo file's setup imports outside the graded code (the templates' own lines)
SETUP = "handgrad.dojo.setup"
SETUP_HELPERS = {"lecture_gradients": "autograd"}  # a setup helper that is autograd when it is graded code
# modules that reach outside the gradients: files, processes, the network, the interpreter's insides
OUTSIDE_MODULES = frozenset(
    {
        "os",
        "sys",
        "subprocess",
        "ctypes",
        "cffi",
        "socket",
        "ssl",
        "http",
        "urllib",
        "requests",
        "ftplib",
        "smtplib",
        "gc",
        "inspect",
        "importlib",
        "builtins",
        "signal",
        "threading",
        "multiprocessing",
        "concurrent",
        "asyncio",
        "pty",
        "tty",
        "termios",
        "fcntl",
        "mmap",
        "resource",
        "select",
        "selectors",
        "pickle",
        "marshal",
        "shelve",
        "dill",
        "cloudpickle",
        "shutil",
        "pathlib",
        "io",
        "tempfile",
        "glob",
        "runpy",
        "code",
        "codeop",
        "types",
        "sysconfig",
        "site",
        "atexit",
        "faulthandler",
        "tracemalloc",
        "traceback",
        "linecache",
        "dis",
        "weakref",
        "pkgutil",
        "zipimport",
        "webbrowser",
        "platform",
        "posix",
        "pwd",
        "grp",
        "readline",
        "rlcompleter",
        "pdb",
        "bdb",
        "trace",
        "cProfile",
        "profile",
        "zipfile",
        "tarfile",
        "sqlite3",
        "dbm",
        "logging",
        "socketserver",
        "xmlrpc",
        "email",
        "mailbox",
    }
)
TORCH_OUTSIDE = (
    "torch.load",
    "torch.save",
    "torch.from_file",
    "torch.hub",
    "torch.utils",
    "torch.ops",
    "torch.library",
    "torch.classes",
    "torch.jit",
    "torch.package",
    "torch.multiprocessing",
    "torch.distributed",
    "torch.cuda",
    "torch.backends",
    "torch.compile",
    "torch.export",
    "torch.fx",
    "torch.overrides",
)
BUILTINS = {  # a builtin that reaches outside, or runs code it is given as text
    "exec": "runs code it builds at run time (exec)",
    "eval": "runs code it builds at run time (eval)",
    "compile": "compiles code at run time",
    "__import__": "imports by name at run time",
    "open": "opens a file",
    "input": "reads the terminal",
    "breakpoint": "stops in a debugger",
    "globals": "reads the module's namespace as a dict",
    "locals": "reads a namespace as a dict",
    "vars": "reads a namespace as a dict",
    "getattr": "reads an attribute by name",
    "setattr": "sets an attribute by name",
    "delattr": "deletes an attribute by name",
    "memoryview": "reads raw memory",
    "exit": "ends the program",
    "quit": "ends the program",
    "help": "starts the help system",
}
FRAME_ATTRS = frozenset(
    {
        "f_back",
        "f_globals",
        "f_locals",
        "f_builtins",
        "f_code",
        "f_trace",
        "tb_frame",
        "tb_next",
        "gi_frame",
        "gi_code",
        "cr_frame",
        "ag_frame",
        "co_code",
        "co_consts",
        "co_names",
        "func_globals",
    }
)
OK_DUNDER_NAMES = frozenset({"__name__", "__file__", "__doc__", "__main__"})
OK_DUNDER_ATTRS = frozenset(  # the ordinary ones: construction, operators, containers
    "__init__ __name__ __qualname__ __doc__ __len__ __call__ __getitem__ __setitem__ __contains__ __iter__ "
    "__next__ __enter__ __exit__ __repr__ __str__ __bool__ __neg__ __pos__ __abs__ __add__ __radd__ __iadd__ "
    "__sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __matmul__ "
    "__rmatmul__ __pow__ __rpow__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __hash__".split()
)
DUNDER = re.compile(r"__[A-Za-z_]\w*__")

# the child's watch: audit events (and its own) -> (kind, what the learner's code did)
RUNTIME = {
    "exec": ("outside", "ran code built at run time (exec or eval)"),
    "compile": ("outside", "compiled code at run time"),
    "open": ("outside", "opened a file"),
    "os.system": ("outside", "started a program"),
    "subprocess.Popen": ("outside", "started a program"),
    "os.exec": ("outside", "started a program"),
    "os.posix_spawn": ("outside", "started a program"),
    "os.spawn": ("outside", "started a program"),
    "os.fork": ("outside", "started a process"),
    "os.forkpty": ("outside", "started a process"),
    "os.kill": ("outside", "sent a signal to a process"),
    "os.killpg": ("outside", "sent a signal to a process group"),
    "signal.pthread_kill": ("outside", "sent a signal to a thread"),
    "socket.connect": ("outside", "used the network"),
    "socket.bind": ("outside", "used the network"),
    "socket.getaddrinfo": ("outside", "used the network"),
    "ctypes.dlopen": ("outside", "loaded native code"),
    "ctypes.dlsym": ("outside", "loaded native code"),
    "ctypes.addressof": ("outside", "read raw memory"),
    "ctypes.string_at": ("outside", "read raw memory"),
    "sys._getframe": ("outside", "read the running program's frames"),
    "sys._current_frames": ("outside", "read the running program's frames"),
    "object.__getattr__": ("outside", "read the interpreter's internals"),
    "gc.get_objects": ("outside", "read every object of the running program"),
    "gc.get_referrers": ("outside", "read the running program's objects"),
    "gc.get_referents": ("outside", "read the running program's objects"),
    "sys.addaudithook": ("outside", "added an audit hook"),
    "sys.setprofile": ("outside", "traced the running program"),
    "sys.settrace": ("outside", "traced the running program"),
    "os.remove": ("outside", "removed a file"),
    "os.rename": ("outside", "renamed a file"),
    "os.rmdir": ("outside", "removed a directory"),
    "os.mkdir": ("outside", "made a directory"),
    "os.chmod": ("outside", "changed a file's mode"),
    "os.truncate": ("outside", "truncated a file"),
    "os.listdir": ("outside", "listed a directory"),
    "os.scandir": ("outside", "listed a directory"),
    "shutil.rmtree": ("outside", "removed a directory tree"),
    "import": ("outside", "imported a module at run time"),
    "autograd.backward": ("autograd", "ran autograd's backward"),
    "autograd.grad": ("autograd", "ran torch.autograd.grad"),
    "requires_grad": ("autograd", "gave a value that carries autograd's graph"),
}


# Outside findings that hide what the code does from this reading: code built from text, names looked
# up at run time, the interpreter's frames, internals and private attributes, a trace or an audit hook
# that could switch the child's watch off. Strict mode cannot vouch for a row that holds one (opaque()).
OPAQUE = ("code it builds", "code built", "compiles code", "compiled code", "by name", "namespace",
          "internals", "frames", "private attribute", "audit hook", "traced the running",
          "running program's objects", "every object")


def opaque(flag: Flag) -> bool:
    """An outside finding that hides what the code does (OPAQUE): autograd could be behind it."""
    return flag.kind == "outside" and any(w in flag.what for w in OPAQUE)


@dataclass(frozen=True)
class Flag:
    """One finding on one line: what it is (kind), in words, and the rows it touches (none: the file)."""

    line: int
    kind: str  # autograd | handgrad | outside
    what: str  # "calls .backward() (autograd)", "imports os"
    code: str = ""  # the learner's line, stripped
    rows: tuple[str, ...] = ()  # the row keys whose own statements hold it
    seen: bool = False  # reported by the child's watch while the code ran

    def words(self) -> str:
        where = f"line {self.line}" + (f" `{self.code}`" if self.code else "")
        return f"{where}: {self.what}" + (" (seen as it ran)" if self.seen else "")

    def to_json(self) -> dict:
        return {
            "line": self.line,
            "kind": self.kind,
            "what": self.what,
            "code": self.code,
            "rows": list(self.rows),
            "seen": self.seen,
        }


# ---------------------------------------------------------------------------- reading the source
def dotted(node: ast.AST) -> str:
    """`torch.autograd.grad` for the attribute chain rooted at a name ('' otherwise)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return ""


@dataclass
class Walk:
    """One walk over the code the child runs, collecting flags."""

    lines: list[str]
    aliases: dict[str, str] = field(default_factory=dict)  # a name -> the module path it stands for
    own_private: set[str] = field(default_factory=set)  # _attributes the file's own classes assign
    local: set[str] = field(default_factory=set)  # names the file binds itself (shadowing a builtin)
    docs: set[int] = field(default_factory=set)  # ids of the string statements (docstrings): not code
    flags: dict[tuple[int, str], Flag] = field(default_factory=dict)

    def add(self, node: ast.AST, kind: str, what: str) -> None:
        """One flag per line and kind: the first found (the outermost name of a chain) says it."""
        line = getattr(node, "lineno", 0)
        code = self.lines[line - 1].strip()[:120] if 0 < line <= len(self.lines) else ""
        self.flags.setdefault((line, kind), Flag(line, kind, what, code))

    def resolve(self, name: str) -> str:
        root, _, rest = name.partition(".")
        base = self.aliases.get(root, root)
        return f"{base}.{rest}" if rest else base


def _imports(walk: Walk, node: ast.Import | ast.ImportFrom, graded: bool) -> None:
    """Record what an import binds, and flag the import itself."""
    if isinstance(node, ast.Import):
        pairs = [
            (a.name, a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0])
            for a in node.names
        ]
    else:
        mod = ("." * node.level) + (node.module or "")
        pairs = [
            (f"{mod}.{a.name}" if mod else a.name, a.asname or a.name, f"{mod}.{a.name}") for a in node.names
        ]
    for full, bound, target in pairs:
        walk.aliases[bound] = target
        _module_flag(walk, node, full, graded)


def _module_flag(walk: Walk, node: ast.AST, full: str, graded: bool) -> None:
    root = full.split(".")[0]
    if full.startswith("."):
        walk.add(node, "outside", f"imports {full} (a relative import: the file has no package here)")
    elif root == "handgrad":
        setup_name = full[len(SETUP) + 1 :] if full.startswith(SETUP + ".") else None
        if graded or setup_name is None:
            walk.add(node, "handgrad", f"imports {full}: the dojo's own code, not yours")
    elif any(full == m or full.startswith(m + ".") for m in AUTOGRAD_MODULES):
        walk.add(node, "autograd", f"imports {full} (autograd)")
    elif root in OUTSIDE_MODULES or root.startswith("_"):
        walk.add(
            node,
            "outside",
            f"imports {full}, which reaches outside your gradients (files, processes, the interpreter)",
        )
    elif any(full == m or full.startswith(m + ".") for m in TORCH_OUTSIDE):
        walk.add(node, "outside", f"imports {full}, which reaches outside your gradients")


def _name_flag(walk: Walk, node: ast.AST, name: str, graded: bool) -> None:
    """A dotted name in use: autograd, handgrad's own code, or a module that reaches outside."""
    full = walk.resolve(name)
    root = full.split(".")[0]
    if root == "handgrad" and graded:
        helper = full.rsplit(".", 1)[-1]
        if SETUP_HELPERS.get(helper) == "autograd":
            walk.add(node, "autograd", f"calls {helper}, the grader's own autograd helper")
        else:
            walk.add(node, "handgrad", f"uses {full}: the dojo's own code, not yours")
    elif any(full == m or full.startswith(m + ".") for m in AUTOGRAD_MODULES):
        walk.add(node, "autograd", f"uses {full} (autograd)")
    elif any(full == m or full.startswith(m + ".") for m in TORCH_OUTSIDE):
        walk.add(node, "outside", f"uses {full}, which reaches outside your gradients")
    elif root in OUTSIDE_MODULES and root in walk.aliases.values() | walk.aliases.keys() and name != root:
        walk.add(node, "outside", f"uses {full}, which reaches outside your gradients")


def _node_flags(walk: Walk, node: ast.AST, graded: bool) -> None:
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Import, ast.ImportFrom)):
            _imports(walk, sub, graded or sub is not node)
        elif isinstance(sub, ast.Attribute):
            attr = sub.attr
            base = sub.value.id if isinstance(sub.value, ast.Name) else ""
            name = dotted(sub)
            if name and isinstance(sub.ctx, ast.Load):
                _name_flag(walk, sub, name, graded)
            if attr in AUTOGRAD_ATTRS and base not in ("self", "cls"):
                walk.add(sub, "autograd", AUTOGRAD_ATTRS[attr])
            elif DUNDER.fullmatch(attr) and attr not in OK_DUNDER_ATTRS:
                walk.add(sub, "outside", f"reads {attr}, the interpreter's internals")
            elif attr in FRAME_ATTRS:
                walk.add(sub, "outside", f"reads {attr}, the running program's frames")
            elif attr.startswith("_") and base not in ("self", "cls") and attr not in walk.own_private:
                walk.add(sub, "outside", f"reads {attr}, a private attribute (torch's internals)")
        elif isinstance(sub, ast.Name):
            if isinstance(sub.ctx, ast.Load):
                if sub.id in BUILTINS and sub.id not in walk.local:
                    walk.add(sub, "outside", BUILTINS[sub.id])
                elif DUNDER.fullmatch(sub.id) and sub.id not in OK_DUNDER_NAMES:
                    walk.add(sub, "outside", f"reads {sub.id}, the interpreter's internals")
                elif sub.id in walk.aliases:
                    _name_flag(walk, sub, sub.id, graded)
        elif isinstance(sub, ast.Call):
            for kw in sub.keywords:
                if kw.arg == "requires_grad" and not (
                    isinstance(kw.value, ast.Constant) and not kw.value.value
                ):
                    walk.add(sub, "autograd", "makes a tensor with requires_grad (autograd)")
                if kw.arg == "file" and isinstance(sub.func, ast.Name) and sub.func.id == "print":
                    walk.add(sub, "outside", "prints to a file")
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str) and id(sub) not in walk.docs:
            bad = [d for d in DUNDER.findall(sub.value) if d not in OK_DUNDER_NAMES | OK_DUNDER_ATTRS]
            if bad:
                walk.add(sub, "outside", f"names the interpreter's internals in a string ({bad[0]})")


def _bound(tree: ast.AST) -> tuple[set[str], set[str], set[int]]:
    """Names the file binds to something of its own (a learner's `input = x @ W` is no builtin): by a
    def or class, an argument without a default that could be the builtin, or an assignment of a value
    that is computed (not a bare name, attribute or item, which could be the builtin itself). A name bound
    any other way anywhere (a loop, `with`, an import, `open = open`) shadows nothing. Also the _attributes
    its own classes assign on self, and its docstrings."""
    safe, unsafe, private, docs = set(), set(), set(), set()
    plain = (ast.Name, ast.Attribute, ast.Subscript, ast.Starred)
    for n in ast.walk(tree):
        body = getattr(n, "body", None)
        if isinstance(body, list):
            docs |= {
                id(s.value) for s in body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
            }
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            safe.add(n.name)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = n.args
            pos = a.posonlyargs + a.args
            defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
            for arg, d in [*zip(pos, defaults), *zip(a.kwonlyargs, a.kw_defaults)]:
                (safe if d is None or isinstance(d, ast.Constant) else unsafe).add(arg.arg)
            for arg in (a.vararg, a.kwarg):
                if arg is not None:
                    safe.add(arg.arg)
        elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            names = {t.id for tg in targets for t in ast.walk(tg) if isinstance(t, ast.Name)}
            computed = (
                n.value is not None
                and not isinstance(n.value, plain)
                and not (
                    isinstance(n.value, (ast.Tuple, ast.List))
                    and any(isinstance(e, plain) for e in n.value.elts)
                )
            )
            (safe if computed else unsafe).update(names)
        elif isinstance(
            n,
            (
                ast.For,
                ast.AsyncFor,
                ast.comprehension,
                ast.With,
                ast.AsyncWith,
                ast.NamedExpr,
                ast.Import,
                ast.ImportFrom,
                ast.Global,
                ast.Nonlocal,
                ast.ExceptHandler,
            ),
        ):
            for t in ast.walk(
                n.target if isinstance(n, (ast.For, ast.AsyncFor, ast.comprehension, ast.NamedExpr)) else n
            ):
                if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store):
                    unsafe.add(t.id)
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                unsafe |= {a.asname or a.name.split(".")[0] for a in n.names}
            if isinstance(n, (ast.Global, ast.Nonlocal)):
                unsafe |= set(n.names)
            if isinstance(n, ast.ExceptHandler) and n.name:
                unsafe.add(n.name)
        if (
            isinstance(n, ast.Attribute)
            and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name)
            and n.value.id in ("self", "cls")
            and n.attr.startswith("_")
        ):
            private.add(n.attr)
    return safe - unsafe, private, docs


def scan(
    text: str,
    graded: list[ast.stmt],
    setup: list[ast.stmt],
    rows_of: dict[int, tuple[str, ...]] | None = None,
) -> list[Flag]:
    """The flags of the code the child runs: `setup` (imports, definitions: run once) and `graded` (the
    statements graded, and the functions they call). `rows_of`: a graded statement's first line -> the
    row keys it writes. Sorted by line; one flag per line and finding."""
    lines = text.splitlines()
    module = ast.Module([*setup, *graded], [])
    walk = Walk(lines)
    walk.local, walk.own_private, walk.docs = _bound(module)
    for st in setup:
        graded_def = isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        _node_flags(walk, st, graded_def)
    for st in graded:
        _node_flags(walk, st, True)
    rows_of = rows_of or {}
    spans = [(st.lineno, getattr(st, "end_lineno", st.lineno), rows_of.get(st.lineno, ())) for st in graded]
    out = []
    for f in walk.flags.values():
        rows = next((r for a, b, r in spans if a <= f.line <= b), ())
        out.append(Flag(f.line, f.kind, f.what, f.code, tuple(rows)))
    return sorted(out, key=lambda f: (f.line, f.what))


def seen(events: list, lines: list[str], rows_of: dict[int, tuple[str, ...]]) -> list[Flag]:
    """Flags from the child's watch: each event checked against RUNTIME and the file's own lines (the
    child's words are never used; a line outside the file is dropped)."""
    out: dict[tuple[int, str], Flag] = {}
    for ev in events if isinstance(events, list) else []:
        if not isinstance(ev, dict):
            continue
        name, line, detail = ev.get("event"), ev.get("line"), ev.get("detail", "")
        if name not in RUNTIME or not isinstance(line, int) or not 0 < line <= len(lines):
            continue
        kind, what = RUNTIME[name]
        if name == "import" and isinstance(detail, str) and re.fullmatch(r"[\w.]{1,80}", detail):
            what = f"imported {detail} at run time"
            kind = "handgrad" if detail.split(".")[0] == "handgrad" else kind
        elif name == "object.__getattr__" and isinstance(detail, str) and re.fullmatch(r"\w{1,40}", detail):
            what = f"read {detail}, the interpreter's internals"
        rows = next((r for a, r in rows_of.items() if a == line), ())
        out.setdefault((line, what), Flag(line, kind, what, lines[line - 1].strip()[:120], tuple(rows), True))
    return list(out.values())


def merge(static: list[Flag], runtime: list[Flag]) -> list[Flag]:
    """The source's flags, and those the watch saw on a line the source's flags do not already explain."""
    kinds = {(f.line, f.kind) for f in static}
    extra = [f for f in runtime if (f.line, f.kind) not in kinds]
    return sorted([*static, *extra], key=lambda f: (f.line, f.what))
