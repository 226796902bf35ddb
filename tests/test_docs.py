"""The README and docs/ as a reader meets them: links that lead somewhere, figures that are the
measured ones, and the programs marked as runnable running as written."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "flower_app" / "README.md"]
RUNNABLE = "<!-- runs as written: tests/test_docs.py -->"
LINK = re.compile(r"\]\(([^)\s]+)\)")
FIGURE = re.compile(r"(\d+(?:\.\d+)?)(?:x| ms| s\b|%)")  # the number of a ratio, time or share


def headings(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings."""
    titles = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-") for title in titles}


def test_every_relative_link_names_a_file_and_heading_that_exist():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in headings(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_every_figure_in_the_readmes_benchmarks_is_one_in_docs_benchmarks():
    """README figures are copied from docs/benchmarks.md, never measured or rounded on their own."""
    readme = (ROOT / "README.md").read_text()
    summary = readme[readme.index("## Benchmarks") : readme.index("\n## ", readme.index("## Benchmarks") + 5)]
    diagram = readme[readme.index("```\ntraining process") : readme.index("## The two commands")]
    measured = (ROOT / "docs" / "benchmarks.md").read_text()
    figures = FIGURE.findall(summary + diagram)
    assert len(figures) >= 10
    missing = [figure for figure in figures if not re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", measured)]
    assert not missing, missing


def runnable_blocks() -> list[tuple[Path, str]]:
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for marker in re.finditer(re.escape(RUNNABLE) + r"\n```python\n(.*?)```", text, re.S):
            blocks.append((page, marker.group(1)))
    return blocks


def test_the_programs_marked_runnable_run_as_written(tmp_path):
    """Each marked block, as a fresh program, in a directory of its own: twice where the second run
    goes on from the first (resume, FL4Health, retention) or runs over the same names (the
    quickstart). A block marked on two pages (README's copy of the quickstart) runs once."""
    blocks = runnable_blocks()
    assert {page.name for page, _ in blocks} >= {"README.md", "quickstart.md", "resume.md", "fl4health.md"}, blocks
    programs = {code: page for page, code in reversed(blocks)}  # README's block is the quickstart's own
    assert len(programs) == len(blocks) - 1, "README's program is no longer the quickstart's"
    for index, (code, page) in enumerate(programs.items()):
        directory = tmp_path / str(index)
        directory.mkdir()
        (directory / "program.py").write_text(code)
        outputs = []
        for _ in range(1 if "load_state_dict()  # no pickle" in code else 2):
            run = subprocess.run(
                [sys.executable, "program.py"], cwd=directory, capture_output=True, text=True, timeout=300
            )
            assert run.returncode == 0, f"{page.relative_to(ROOT)}: {run.stderr[-3000:]}"
            outputs.append(run.stdout)
        if "restored round" in code:  # the quickstart: its state load sees the save just made
            assert all("restored round 3" in output for output in outputs), outputs
        if 'saved")' in code:  # the plain PyTorch resume
            assert outputs[0].split() == ["epoch", "0", "saved", "epoch", "1", "saved", "epoch", "2", "saved"]
            assert outputs[1].split() == ["epoch", "3", "saved", "epoch", "4", "saved", "epoch", "5", "saved"]
        if "ClientStateCheckpointer" in code:  # FL4Health 0.4: the second run restored the first's state
            assert outputs == ["client steps 1, server round 1\n", "client steps 2, server round 2\n"], outputs
        if "retention import" in code:  # rounds kept by the policy, the same after a run over the same names
            assert all(output.startswith("[10, 20, 25, 26, 30, 39, 40, 41]\n") for output in outputs), outputs
        if "load_state_dict()  # no pickle" in code:
            assert outputs == ["Sequential ['0.bias', '0.weight', '2.bias', '2.weight'] 3\n"], outputs


def test_the_api_reference_builds_from_the_docstrings_without_a_warning(tmp_path):
    """``docs/api``: Sphinx's autodoc over the public API, every warning an error."""
    sphinx = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs" / "api")]
    build = subprocess.run([*sphinx, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-5000:]
    flower = (tmp_path / "flower.html").read_text()
    assert "run_checkpoint_dir" in flower and "ClientCheckpoints" in flower
    assert "ClientStateCheckpointer" in (tmp_path / "fl4health.html").read_text()
