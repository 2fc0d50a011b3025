"""The architecture's rules, read from the source: imports point one way, the optional packages
load only when asked for, and the test modules stand alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "erfnet"
# The opt-in layers: the core never imports them; train.py / eval.py only inside a function.
EXTRAS = ("erfnet.data.fast", "erfnet.deploy", "erfnet.video", "erfnet.bench")
# Optional packages, and av (video only): importing erfnet, train or eval loads none of them.
OPTIONAL_PACKAGES = ("onnx", "onnxruntime", "openvino", "nncf", "av", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, top_level_only: bool = False, package: str = "") -> set[str]:
    """Every module an ``import`` / ``from ... import`` in ``path`` names, inside functions too
    unless ``top_level_only`` (relative ones resolved against ``package``, by default the file's
    own; ``from pkg import name`` counts as ``pkg.name`` too, since name may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if not package:
        own = module_name(path)
        package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_extra(module: str) -> bool:
    return any(module == e or module.startswith(e + ".") for e in EXTRAS)


def core_files() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if not is_extra(module_name(path)):
            files.append(path)
    return files


def test_core_never_imports_the_extras() -> None:
    assert len(core_files()) > 20  # the walk found the package
    offenders = {
        str(path.relative_to(REPO)): sorted(m for m in imported_modules(path) if is_extra(m))
        for path in core_files()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_entry_points_import_extras_only_inside_functions(script: str) -> None:
    top = imported_modules(REPO / script, top_level_only=True)
    assert sorted(m for m in top if is_extra(m)) == []


def test_importing_erfnet_train_and_eval_loads_no_optional_package() -> None:
    code = (
        "import sys, erfnet, train, eval\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL_PACKAGES!r}"
        f" or any(m == e or m.startswith(e + '.') for e in {EXTRAS!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_rule_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from erfnet.deploy import onnx\n    from ..video import io\n")
    names = imported_modules(fake, package="erfnet.training")
    assert {"erfnet.deploy.onnx", "erfnet.video.io"} <= names
    assert is_extra("erfnet.deploy.onnx") and is_extra("erfnet.video.io")
    assert not is_extra("erfnet.data.folder") and not is_extra("erfnet.deployment")


def test_no_test_module_imports_another() -> None:
    """`from tests.x import ...` breaks where another package named `tests` is installed
    (mmsegmentation ships one): shared helpers live in conftest.py as fixtures."""
    tests_dir = REPO / "tests"
    own = {p.stem for p in tests_dir.glob("*.py")}
    offenders = {}
    for path in sorted(tests_dir.glob("test_*.py")):
        names = imported_modules(path)
        bad = sorted(n for n in names if n.split(".")[0] == "tests" or n.split(".")[0] in own)
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


def test_product_modules_stay_small_and_the_step_module_narrow() -> None:
    """One concern per module: no product module (erfnet/, scripts/, train.py, eval.py) over 450
    lines; the step module (one iteration) imports at most 4 project modules (signals, the lock
    and failures live in process.py)."""
    product = [*PACKAGE.rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    product += [REPO / "train.py", REPO / "eval.py"]
    long = {
        str(p.relative_to(REPO)): n
        for p in sorted(product)
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert long == {}
    step = REPO / "erfnet" / "training" / "step.py"
    names = imported_modules(step)
    project = {m for m in names if (REPO / f"{m.replace('.', '/')}.py").is_file()}
    assert len(project) <= 4, sorted(project)
