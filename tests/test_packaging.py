"""The package metadata, the conda environment and the README agree with each other."""

import re
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = _pyproject()["project"]
    wanted = {r for r in project["dependencies"]}
    for extra in ("book", "test"):
        wanted |= set(project["optional-dependencies"][extra])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip_section if not r.startswith("-e")}
    # the same names and the same version ranges, spaces aside
    normalise = lambda reqs: {r.replace(" ", "") for r in reqs}  # noqa: E731
    assert normalise(listed) == normalise(wanted)


def test_version_ranges_admit_this_machines_torch_pair():
    deps = {_name(r): r for r in _pyproject()["project"]["dependencies"]}
    assert deps["torch"].startswith("torch>=") and "<" not in deps["torch"]
    assert tuple(map(int, deps["torch"].split(">=")[1].split("."))) <= (2, 14)
    assert tuple(map(int, deps["torchvision"].split(">=")[1].split("."))) <= (0, 29)


def test_jupyter_book_is_pinned_to_version_1():
    book = _pyproject()["project"]["optional-dependencies"]["book"]
    assert any(r.replace(" ", "").startswith("jupyter-book>=1,<2") for r in book)


def test_console_script_and_python_m_show_help():
    for command in (["resnet-lessons", "--help"], [sys.executable, "-m", "resnet_lessons", "--help"]):
        if command[0] == "resnet-lessons":
            command[0] = str(Path(sys.executable).with_name("resnet-lessons"))
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage: resnet-lessons" in result.stdout


def test_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make book" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make book" in ci


def test_the_published_edition_is_built_in_the_cpu_profile_checked_in_a_browser_and_deployed():
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    build, deploy = workflow["jobs"]["build"], workflow["jobs"]["deploy"]
    assert build["env"]["RESNET_LESSONS_PROFILE"] == "cpu" and build["env"]["RESNET_LESSONS_DATA"] == "cifar10"
    runs = [step.get("run", "") for step in build["steps"]]
    uses = [step.get("uses", "") for step in build["steps"]]
    book = next(i for i, run in enumerate(runs) if run.startswith("make book"))
    browser = next(i for i, run in enumerate(runs) if run.startswith("make test-browser"))
    assert book < browser < uses.index("actions/upload-pages-artifact@v3")
    assert any(u.startswith("actions/cache") for u in uses), "CIFAR-10's download is cached between runs"
    assert deploy["needs"] == "build" and deploy["steps"][0]["uses"].startswith("actions/deploy-pages")
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
