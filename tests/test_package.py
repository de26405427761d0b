"""The package as users get it: `pip install` with its real dependencies into a fresh virtual environment, then
the README's monitor snippet and the `diagnose` command run from another folder, with nothing of this repository
or of the development environment on the path. A dependency the package forgets to declare fails here."""

import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT, load_events, readme_python


def test_pip_installs_the_package_with_its_dependencies_and_the_readme_snippet_runs_elsewhere(tmp_path):
    source, venv, project = tmp_path / "source", tmp_path / "venv", tmp_path / "project"
    shutil.copytree(ROOT / "gradwatch", source / "gradwatch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, diagnose = venv / "bin" / "python", venv / "bin" / "diagnose"
    # --no-compile only skips writing torch's .pyc files (20 s); what gets installed is what `pip install` installs
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-compile", str(source)]
    result = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr

    project.mkdir()
    (project / "snippet.py").write_text(readme_python("## Three ways to use it"))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*command):
        return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)

    where = run(str(python), "-c", "import gradwatch; print(gradwatch.__file__)")
    assert where.stdout.startswith(str(venv)) and "site-packages" in where.stdout, where.stderr
    result = run(str(python), "snippet.py")
    assert result.returncode == 0, result.stderr
    assert "epoch 5" in result.stdout and "tensorboard --logdir Result" in result.stdout  # it says what it did
    run_dir = project / "Result" / "my-loop"
    tags = set(load_events(run_dir).Tags()["histograms"])
    assert {"0.weight_data", "0.weight_grad", "2.bias_data", "2.bias_grad"} <= tags
    assert isinstance(json.loads((run_dir / "diagnosis.json").read_text())["findings"], list)

    result = run(str(diagnose), "Result")  # the console script, reading the log with the installed tensorboard
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("my-loop: 5 epochs, 4 parameters, diagnosed as the monitor did;")
    result = run(str(diagnose), "--json", "Result")
    assert result.returncode == 0 and json.loads(result.stdout)["my-loop"] is not None, result.stderr
