"""The README's Python example runs as written, and its list of exports is the package's."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import prunekit

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python block"
    return blocks[0]


def test_readme_python_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_python_block())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    before, after = (int(s.replace(",", "")) for s in re.search(r"MACs ([\d,]+) -> ([\d,]+)", out).groups())
    reloaded = int(re.search(r"reloaded MACs (\d+)", out).group(1))
    assert reloaded == after < before  # the saved file rebuilds the pruned widths
    assert 0.4 <= after / before <= 0.5 + 1e-9  # macs_fraction=0.5 is met, not overshot by much
    assert float(re.search(r"test accuracy ([\d.]+)", out).group(1)) > 0.9
    assert (tmp_path / "small_cnn_pruned.safetensors").exists()


def test_readme_lists_every_export():
    text = README.read_text()
    listed = re.search(r"`prunekit` exports: (.*?)\. They are imported", text, flags=re.S).group(1)
    names = set(re.findall(r"`([A-Za-z_]+)`", listed))
    assert names == set(prunekit.__all__)
