"""Code imports downward only (DESIGN.md section 1, "Layers"), read from every module's imports.

  top      entrypoints/, bench/          what a person runs; may import everything below
  middle   inference_svc/, adapter_svc/, endpoint_picker/
                                         peers: they meet only through protobuf and Redis keys
  bottom   loraserve/, kernels/          shared; loraserve/ is also torch-free

Imports inside functions count too. Each failure names the file and line of the import.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {
    "loraserve": 0,
    "kernels": 0,
    "inference_svc": 1,
    "adapter_svc": 1,
    "endpoint_picker": 1,
    "entrypoints": 2,
    "bench": 2,
}
MIDDLE = {name for name, layer in LAYER.items() if layer == 1}
PEERS = {name: MIDDLE - {name} for name in MIDDLE}


# Run in a child process: CPython 3.11's ast module keeps one recursion counter per interpreter,
# and a parse racing another thread's (Triton parses kernels on engine threads left by earlier
# tests) fails with "AST constructor recursion depth mismatch" (python/cpython#106905).
SCAN = """
import ast, json, sys
from pathlib import Path
root, package = Path(sys.argv[1]), sys.argv[2]
found = []
for path in sorted((root / package).rglob("*.py")):
    if "v1" in path.relative_to(root / package).parts[:1]:  # generated stubs import only protobuf
        continue
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(str(path.relative_to(root)), node.lineno, n.split(".")[0]) for n in names]
print(json.dumps(found))
"""


@functools.cache
def imports(package: str) -> list[tuple[str, int, str]]:
    """(file relative to the repo, line, imported top-level name) of every import in a package."""
    done = subprocess.run(
        [sys.executable, "-c", SCAN, str(ROOT), package],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [tuple(entry) for entry in json.loads(done.stdout)]


def assert_none(package: str, forbidden, rule: str) -> None:
    bad = [f"{file}:{line} imports {name}" for file, line, name in imports(package) if forbidden(name)]
    assert not bad, f"{rule}:\n  " + "\n  ".join(bad)


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(LAYER), f"add a new package to LAYER: {sorted(packages ^ set(LAYER))}"


@pytest.mark.parametrize("package", sorted(PEERS))
def test_the_services_never_import_each_other(package):
    assert_none(package, lambda name: name in PEERS[package], "the services are peers")


@pytest.mark.parametrize("package", sorted(LAYER))
def test_no_package_imports_a_layer_above_it(package):
    assert_none(package, lambda name: LAYER.get(name, -1) > LAYER[package], "imports go downward only")


def test_the_shared_layer_does_not_import_torch():
    assert_none(
        "loraserve", lambda name: name in ("torch", "triton", "safetensors"), "loraserve/ is torch-free"
    )


@pytest.mark.parametrize(
    "module", ["adapter_svc.server", "adapter_svc.manager", "adapter_svc.cli", "endpoint_picker.server"]
)
def test_the_torch_free_processes_do_not_load_torch(module):
    code = f"import sys, {module}; loaded = sorted(m for m in ('torch', 'inference_svc') if m in sys.modules); print(loaded)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing {module} loads {done.stdout.strip()}"
