"""The package as users get it: pip installs it into a folder of its own, and the README's monitor snippet and
the `diagnose` command run from another folder, with nothing of this repository on the path."""

import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT, load_events, readme_python


def test_pip_installs_the_package_and_the_readme_snippet_runs_elsewhere(tmp_path):
    source, site, project = tmp_path / "source", tmp_path / "site", tmp_path / "project"
    shutil.copytree(ROOT / "gradwatch", source / "gradwatch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    result = subprocess.run([*install, "--target", str(site), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

    project.mkdir()
    (project / "snippet.py").write_text(readme_python("## The monitor in your own training loop"))
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*command):
        return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)

    where = run(sys.executable, "-c", "import gradwatch; print(gradwatch.__file__)")
    assert where.stdout.strip() == str(site / "gradwatch" / "__init__.py"), where.stderr
    result = run(sys.executable, "snippet.py")
    assert result.returncode == 0, result.stderr
    assert "epoch 5" in result.stdout and "tensorboard --logdir Result" in result.stdout  # it says what it did
    run_dir = project / "Result" / "my-loop"
    tags = set(load_events(run_dir).Tags()["histograms"])
    assert {"0.weight_data", "0.weight_grad", "2.bias_data", "2.bias_grad"} <= tags
    assert isinstance(json.loads((run_dir / "diagnosis.json").read_text()), list)

    result = run(str(site / "bin" / "diagnose"), "Result")  # the console script
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("my-loop: 5 epochs, 4 parameters, diagnosed as the monitor did;")
