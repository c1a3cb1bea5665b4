"""Notebook hygiene: the chapters stay short, clean, complete and runnable on their own."""

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))
MAX_LINES = 15


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _code_cells(path: Path) -> list[dict]:
    return [c for c in _cells(path) if c["cell_type"] == "code"]


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part["chapters"])
    return files


def _repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def test_there_are_chapters():
    assert CHAPTERS, "book/ has no notebooks"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_stored_outputs(path):
    for cell in _code_cells(path):
        assert not cell.get("outputs") and cell.get("execution_count") is None, _source(cell)[:80]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_first_code_cell_is_the_setup_cell_that_installs_from_the_repository(path):
    first = _source(_code_cells(path)[0])
    assert "import resnet_lessons" in first and "except ImportError" in first
    assert f"git+{_repository_url()}" in first, "the install URL must be _config.yml's repository.url"
    assert "book.setup(" in first


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_cells_are_short_and_define_nothing_outside_exercises(path):
    for cell in _code_cells(path):
        source = _source(cell)
        assert len(source.splitlines()) <= MAX_LINES, f"cell longer than {MAX_LINES} lines:\n{source}"
        if "exercise" in cell.get("metadata", {}).get("tags", []):
            continue
        # IPython magics are not Python; blank them before parsing
        tree = ast.parse(re.sub(r"^(\s*)[%!].*$", r"\1pass", source, flags=re.M))
        defined = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defined, f"def/class in a cell not tagged 'exercise':\n{source}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapters_use_no_star_imports_and_no_cross_chapter_files(path):
    for cell in _code_cells(path):
        source = _source(cell)
        assert not re.search(r"^\s*from\s+\S+\s+import\s+\*", source, flags=re.M), source


def test_toc_and_book_folder_agree():
    listed = set(_toc_files())
    for name in listed:
        assert any((ROOT / f"{name}{suffix}").exists() for suffix in (".ipynb", ".md")), f"{name} is missing"
    on_disk = {p.relative_to(ROOT).with_suffix("").as_posix() for p in CHAPTERS}
    assert on_disk <= listed, f"not in _toc.yml: {sorted(on_disk - listed)}"


TRAINING_CALLS = ("train.fit(", "finetune.finetune(", "transfer_experiment(", "reference_model(")
CONFIG_BUILDERS = {"config_from_profile", "finetune_config", "TrainConfig"}


def _calls(source: str) -> list[ast.Call]:
    tree = ast.parse(re.sub(r"^(\s*)[%!].*$", r"\1pass", source, flags=re.M))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_training_run_takes_its_time_from_the_chapters_budget(path):
    """No fixed-epoch training: a chapter's recipes come from session.recipe / session.budget (a share of the
    profile's chapter budget), or a config builder given budget_seconds; nothing sets epochs."""
    source = "\n".join(_source(c) for c in _code_cells(path) if "exercise" not in c.get("metadata", {}).get("tags", []))
    for call in _calls(source):
        keywords = {k.arg for k in call.keywords}
        assert "epochs" not in keywords, f"{path.name}: {_name(call)}(..., epochs=...) ignores the chapter's budget"
        if _name(call) in CONFIG_BUILDERS:
            assert "budget_seconds" in keywords, f"{path.name}: {_name(call)}(...) without budget_seconds"
    if any(marker in source for marker in TRAINING_CALLS):
        assert re.search(r"session\.(recipe|budget)\(|book\.reference_model\(", source), path.name


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_chapter_ends_by_gluing_its_own_time(path):
    assert _source(_code_cells(path)[-1]).strip() == "book.finish(session)"
