"""The code's shape (tools/shape.py) within the limits README states, and the measures themselves able to see
what they look for."""

import sys

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "tools"))
import shape  # noqa: E402


def test_the_source_keeps_to_its_shape():
    result = run_script(ROOT / "tools" / "shape.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 6 and "FAIL" not in result.stdout


def test_the_measures_find_what_they_look_for(tmp_path, monkeypatch):
    monkeypatch.setattr(shape, "ROOT", tmp_path)
    code = tmp_path / "sample.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(41))
    attributes = "\n".join(f"        self.a{i} = {i}" for i in range(16))
    branches = "\n".join(f"    if x == {i}:\n        return {i}" for i in range(9))
    code.write_text(
        f"def long():\n{body}\n\n\nclass Big:\n    def __init__(self):\n{attributes}\n\n\n"
        f"def branched(x):\n{branches}\n\n\na, b = 1, 2\n{'y = 1  # ' + 'w' * 100}\n"
    )
    assert [where for _, where in shape.long_functions([code])] == ["sample.py:1 long"]
    assert [(m, a) for m, a, _ in shape.large_classes([code])] == [(1, 16)]
    assert [c for c, _ in shape.complex_functions([code], 8)] == [10]
    lines = code.read_text().splitlines()
    assert shape.packed_assignments([code]) == [f"sample.py:{lines.index('a, b = 1, 2') + 1}"]
    assert shape.wide_share([code]) == (1, len(lines))
