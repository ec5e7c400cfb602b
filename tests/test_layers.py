"""The layers of docs/architecture.md: which ectune modules each layer may import (read from the source,
every import statement, at any depth, absolute or relative)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ectune"

# layer -> the ectune modules (top-level names under ectune) it must never import
FORBIDDEN = {
    "networks": {"losses", "sampling", "training", "cli", "models", "precond", "runs", "monitor", "demo"},
    "losses": {"networks", "models", "training", "cli", "runs", "monitor", "data", "metrics", "importers"},
    "sampling": {"networks", "models", "training", "cli", "runs", "monitor", "data", "metrics", "importers"},
    "schedules": {"networks", "models", "training", "cli", "losses", "sampling"},
    "precond": {"networks", "models", "training", "cli", "losses", "sampling"},
    "metrics": {"training", "cli", "runs", "monitor", "demo", "losses", "networks"},
    "data": {"training", "cli", "runs", "monitor", "demo", "losses", "sampling", "networks", "metrics"},
    "methods": {"training", "trainstate", "cli", "runs", "start", "monitor", "demo", "bench", "networks", "models",
                "data", "metrics"},
}
ALL = {p.stem for p in SRC.glob("*.py")} | {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
FORBIDDEN.update({leaf: ALL - {leaf, "errors"} for leaf in ("rng", "hashing", "config")})
FORBIDDEN["presets"] = ALL - {"presets", "config", "errors", "networks"}


def ectune_imports(path: Path) -> set[str]:
    """The top-level ectune modules a source file imports (``from .x``, ``from ectune.x``, ``import ectune.x``)."""
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]      # ("ectune", "networks")
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            parts = base + (node.module.split(".") if node.module else [])
            names = [parts] if node.module else [parts + [a.name] for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        out |= {p[1] for p in names if len(p) > 1 and p[0] == "ectune"}
    return out


def layer_files(layer: str) -> list[Path]:
    return sorted((SRC / layer).rglob("*.py")) if (SRC / layer).is_dir() else [SRC / f"{layer}.py"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_against_the_arrows(layer):
    bad = {f"{f.relative_to(SRC)} imports {m}" for f in layer_files(layer) for m in ectune_imports(f) & FORBIDDEN[layer]}
    assert not bad, sorted(bad)


def test_the_import_reader_sees_a_forbidden_import(tmp_path, monkeypatch):
    """Control: a networks module that imported the losses (relatively, inside a function) is caught."""
    fake = SRC / "networks" / "_layer_probe.py"
    monkeypatch.setattr(Path, "rglob", lambda self, pat: [fake] if self == SRC / "networks" else [])
    source = "def f():\n    from ..losses import ect_loss\n    import ectune.sampling\n"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    assert ectune_imports(fake) == {"losses", "sampling"}
    with pytest.raises(AssertionError, match="imports losses"):
        test_no_layer_imports_against_the_arrows("networks")
