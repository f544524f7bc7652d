"""The layout's rules: no import circles between qkit's modules at import time."""
import ast
import importlib.util


PACKAGES = ("qkit", "qkit.model", "qkit.export", "qkit.ggml", "qkit.gguf", "qkit.ann", "qkit.ext", "qkit.eval", "qkit.cli")


def _modules() -> dict[str, str]:
    """Every module of the installed packages (setup.cfg's list; ann/ ext/ eval/ cli/ map to qkit.*) -> its file."""
    from pathlib import Path

    out = {}
    for pkg in PACKAGES:
        init = Path(importlib.util.find_spec(pkg).origin)
        out[pkg] = str(init)
        for f in sorted(init.parent.glob("*.py")):
            if f.name != "__init__.py":
                out[f"{pkg}.{f.stem}"] = str(f)
    return out


def _top_level_imports(name: str, path: str, known: set[str]) -> set[str]:
    """qkit modules that `name` imports when it is imported: module-level statements only (imports inside
    functions are deferred on purpose; `if TYPE_CHECKING:` blocks never run). `from pkg import sub` counts as
    an import of pkg.sub when that is a module."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    deps = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for a in node.names:
                    if f"{base}.{a.name}" in known:
                        deps.add(f"{base}.{a.name}")
                    elif base in known:
                        deps.add(base)

    visit(tree.body)
    deps.discard(name)
    return deps


def test_no_import_circles():
    mods = _modules()
    assert {"qkit.chooser", "qkit.ann", "qkit.ext", "qkit.eval", "qkit.cli", "qkit.model.online"} <= set(mods)
    graph = {n: _top_level_imports(n, p, set(mods)) for n, p in mods.items()}
    # a package's __init__ importing its own submodules is the package's API, not a circle through it
    cycles, state, stack = [], {}, []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if n.startswith(d + ".") or d.startswith(n + ".") and n in ("qkit",):
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_package_list_is_setup_cfgs():
    import configparser
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    assert set(cfg["options"]["packages"].split()) == set(PACKAGES)


def test_without_the_compiled_extension_ann_imports_and_says_what_it_needs(tmp_path):
    """qkit.ann, qkit.ext and the CLI import on an install whose extension did not build (both .so blocked):
    the kernels fall back to Numba, the codecs and their distances work, and an HNSW index is refused in one
    line that names what is missing, before any data is prepared."""
    import subprocess
    import sys

    code = r'''
import sys
sys.modules["qkit.ext._kernels"] = None  # import of a None entry raises ImportError, as a missing .so does
sys.modules["qkit.ext._hnsw"] = None
import numpy as np
from qkit import ext
from qkit.ann import Index, codecs
from qkit.errors import UsageError
assert not ext.native_available() and ext.default_backend() == "numba"
X = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
c = codecs.make_codec("sq8", 16).fit(X)
d = c.distances(X[0], c.encode(X))
assert d.shape == (50,) and int(np.argmin(d)) == 0
try:
    Index(16)
except UsageError as e:
    print("refused:", e)
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "refused: qkit's HNSW graph runs in the compiled extension" in r.stdout
    # the CLI: one line, exit 2, no traceback
    import numpy as np

    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32))
    cli = ("import sys; sys.modules['qkit.ext._kernels'] = None; sys.modules['qkit.ext._hnsw'] = None; "
           "from qkit.cli.main import main; "
           f"sys.argv = ['qkit', 'ann', 'build', {str(tmp_path / 'v.npy')!r}, '-o', {str(tmp_path / 'i.qidx')!r}]; "
           "sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "HNSW graph runs in the compiled extension" in err[0], r.stderr
    assert not (tmp_path / "i.qidx").exists()
