"""The code's shape, measured: how long its functions are, how large its classes, how branched and how
dense, against the limits the project keeps to. Prints the figures; exits 1 when a limit is passed.

    python tools/shape.py            # every limit, with the worst offenders
    python tools/shape.py --quiet    # the failures only

Limits (README, Layout): no function over 40 lines (docstring included) in the package and the training
script; no class over 20 methods or 15 instance attributes; ruff's cyclomatic complexity at most 8 in the
package and over 7 in at most 5 functions of the non-test source; at most 8% of the package's lines over
100 characters; no packed assignment of several values (`a, b = x, y`) in the package.
"""

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = sorted((ROOT / "gradwatch").rglob("*.py"))
SCRIPT = [ROOT / name for name in ("train.py", "options.py", "checkpoints.py", "distributed.py")]
SOURCE = sorted({*PACKAGE, *ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "tools").glob("*.py")})
MAX_LINES, MAX_METHODS, MAX_ATTRIBUTES = 40, 20, 15
MAX_COMPLEXITY, COMPLEX, MAX_COMPLEX = 8, 7, 5
# A flat record of settings, one field per threshold of the diagnosis rules, which users set by name
# (--threshold NAME=VALUE): its size is the number of thresholds, not of jobs the class does.
SETTINGS = {"gradwatch/diagnosis/thresholds.py:Thresholds"}
WIDE, MAX_WIDE_SHARE = 100, 0.08


def where(path, node):
    return f"{path.relative_to(ROOT)}:{node.lineno} {getattr(node, 'name', '')}".rstrip()


def long_functions(paths):
    """(lines, where) of every function longer than MAX_LINES."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append((lines, where(path, node)))
    return sorted(found, reverse=True)


def instance_attributes(node):
    """The names a class's methods assign as self.<name>, and a dataclass's fields."""
    names = set()
    if any("dataclass" in ast.unparse(d) for d in node.decorator_list):
        names |= {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    for item in ast.walk(node):
        targets = item.targets if isinstance(item, ast.Assign) else [getattr(item, "target", None)]
        for target in targets:
            for part in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(part, ast.Attribute) and getattr(part.value, "id", None) == "self":
                    names.add(part.attr)
    return names


def large_classes(paths):
    """(methods, attributes, where) of every class over MAX_METHODS methods or MAX_ATTRIBUTES
    instance attributes."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and f"{path.relative_to(ROOT)}:{node.name}" not in SETTINGS:
                methods = [f for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
                # a property reads as an attribute, and is derived: neither a method nor stored state
                methods = [f for f in methods if not any(ast.unparse(d) == "property" for d in f.decorator_list)]
                attributes = instance_attributes(node)
                if len(methods) > MAX_METHODS or len(attributes) > MAX_ATTRIBUTES:
                    found.append((len(methods), len(attributes), where(path, node)))
    return found


def complex_functions(paths, above):
    """(complexity, where) of the functions whose complexity ruff finds above `above`."""
    command = [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "C901", "--output-format", "json"]
    command += ["--config", f"lint.mccabe.max-complexity={above}", *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    found = []
    for item in json.loads(result.stdout or "[]"):
        complexity = int(item["message"].split("(")[1].split(" ")[0])
        found.append((complexity, f"{Path(item['filename']).relative_to(ROOT)}:{item['location']['row']}"))
    return sorted(found, reverse=True)


def wide_share(paths):
    """(lines over WIDE characters, all lines) of the files."""
    lines = [line for path in paths for line in path.read_text().splitlines()]
    return sum(len(line) > WIDE for line in lines), len(lines)


def packed_assignments(paths):
    """Where an assignment packs several values at once: `a, b = x, y`."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                if any(isinstance(target, ast.Tuple) for target in node.targets):
                    found.append(where(path, node))
    return found


def report(quiet=False):
    """Print the figures; returns the number of limits passed."""
    failures = 0

    def show(ok, text, items=()):
        nonlocal failures
        failures += not ok
        if not ok or not quiet:
            print(f"{'ok  ' if ok else 'FAIL'} {text}")
            for item in list(items)[: 10 if not ok else 3]:
                print(f"       {item}")

    long = long_functions([*PACKAGE, *[p for p in SCRIPT if p.exists()]])
    show(not long, f"functions over {MAX_LINES} lines in the package and the training script: {len(long)}", long)
    large = large_classes(SOURCE)
    about = f"classes over {MAX_METHODS} methods or {MAX_ATTRIBUTES} instance attributes: {len(large)}"
    show(not large, about, large)
    package = complex_functions(PACKAGE, MAX_COMPLEXITY)
    show(not package, f"package functions over complexity {MAX_COMPLEXITY}: {len(package)}", package)
    complex_ = complex_functions(SOURCE, COMPLEX)
    show(len(complex_) <= MAX_COMPLEX, f"non-test functions over complexity {COMPLEX}: {len(complex_)} (at most "
         f"{MAX_COMPLEX})", complex_)  # fmt: skip
    wide, total = wide_share(PACKAGE)
    show(wide <= MAX_WIDE_SHARE * total, f"package lines over {WIDE} characters: {wide} of {total} ({wide / total:.1%}"
         f", at most {MAX_WIDE_SHARE:.0%})")  # fmt: skip
    packed = packed_assignments(PACKAGE)
    show(not packed, f"packed assignments (a, b = x, y) in the package: {len(packed)}", packed)
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="print the limits passed only")
    args = parser.parse_args(argv)
    return 1 if report(args.quiet) else 0


if __name__ == "__main__":
    sys.exit(main())
