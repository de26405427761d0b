"""README and docs/ as users read them: every snippet run as printed by a test, every link leading somewhere, and
README a few screens long."""

import re

import pytest
from conftest import DOCUMENTS, ROOT, python_blocks

# every Python block of README.md and docs/ (the index-th under its heading), and the tests that run it as printed
# (an excerpt is marked ```py)
RUN_BY = {
    ("README.md", "## Three ways to use it", 0): ("test_package.py", "test_diagnosis.py"),
    ("README.md", "## Three ways to use it", 1): ("test_parts.py",),
    ("README.md", "## Three ways to use it", 2): ("test_parts.py",),
    ("frameworks.md", "#### A Lightning example", 0): ("test_lightning.py",),
    ("frameworks.md", "#### A Hugging Face example", 0): ("test_transformers.py",),
    ("library.md", "## The API", 0): ("test_diagnosis.py",),
    ("library.md", "### Loops counted in steps", 0): ("test_step_diagnosis.py",),
    ("library.md", "### Gradient clipping", 0): ("test_diagnosis.py",),
}


def test_every_python_block_is_run_by_a_test_that_reads_it_by_its_heading():
    blocks = python_blocks()
    found = []
    for name, heading, _ in blocks:
        found.append((name, heading, sum((name, heading) == (n, h) for n, h, _ in found)))
    assert sorted(found) == sorted(RUN_BY)
    for (_, heading, index), tests in RUN_BY.items():
        call = f"readme_python({heading!r}{f', {index}' if index else ''})"
        for test in tests:
            assert call in (ROOT / "tests" / test).read_text().replace('"', "'"), (heading, test)
    for _, heading, code in blocks:
        compile(code, heading, "exec")  # each is whole Python, as printed


def slug(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip("# \n").lower()).replace(" ", "-")


def test_every_link_between_the_documents_leads_to_a_file_and_a_heading_there():
    anchors = {
        path: {slug(line) for line in path.read_text().splitlines() if line.startswith("#")} for path in DOCUMENTS
    }
    for path in DOCUMENTS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)\s]+))?\)", text):
            where = (path.parent / target).resolve() if target else path
            assert where.exists(), f"{path.name}: link to {target}"
            if anchor and where.suffix == ".md":
                assert anchor in anchors[where], f"{path.name}: link to {target}#{anchor}"


def test_readme_is_a_few_screens_and_says_how_it_was_measured_not_made():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") < 250
    for document in DOCUMENTS:
        text = document.read_text()
        for words in ("development machine", "was lent", "an earlier run", "<owner>", "this version"):
            assert words not in text, (document.name, words)


NUMBER = r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def test_the_story_in_docs_is_what_train_py_prints_for_its_command(tmp_path, capsys):
    import train

    text = (ROOT / "docs" / "diagnosis.md").read_text()
    start = text.index("```\nDiagnosis (in full in") + 4
    printed = text[start : text.index("```\n", start)]
    assert train.main(["--data", str(ROOT / "Data"), "--log-dir", str(tmp_path), "--lr", "50", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    story = out[out.index("Diagnosis (in full in") : out.index("Per-class results")]
    story = re.sub(r"in \S+/diagnosis.json", "in Result/<run>/diagnosis.json", story)
    # the same words, the numbers within 2%: the story read the same with AVX-512, AVX2 and no vector instructions
    # (ATEN_CPU_CAPABILITY); over 4 epochs, AVX2 added a finding to an earlier story, so it is told for 3
    words, told = re.split(NUMBER, story), re.split(NUMBER, printed)
    assert words[::2] == told[::2], story
    assert [float(n) for n in words[1::2]] == pytest.approx([float(n) for n in told[1::2]], rel=0.02), story
