"""Every module of the package imports on its own, first, in a fresh interpreter state: import
cycles that a usual import order hides (criteria -> elements -> element_masks -> criteria) fail here."""
import subprocess
import sys

SCRIPT = """
import importlib, pkgutil, sys
import prunekit
names = sorted(m.name for m in pkgutil.walk_packages(prunekit.__path__, "prunekit.") if not m.name.endswith("__main__"))
bad = []
for name in names:
    for key in [k for k in sys.modules if k == "prunekit" or k.startswith("prunekit.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as err:
        bad.append(f"{name}: {type(err).__name__}: {err}")
print(len(names))
print("\\n".join(bad))
"""


def test_every_module_imports_first():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    count, *bad = out.stdout.strip().split("\n")
    assert int(count) > 100  # the walk found the package's modules
    assert [b for b in bad if b] == []
