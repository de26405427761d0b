import shutil

from conftest import ROOT, histogram_steps, load_events, make_data, run_script

from utils import Net

TAGS = {name + suffix for name, _ in Net().named_parameters() for suffix in ("_data", "_grad")}


def test_the_tutorials_own_code_runs_against_utils(tmp_path):
    make_data(tmp_path / "Data", per_class=12, valid_per_class=3)
    shutil.copy(ROOT / "tests" / "tutorial_4_4.py", tmp_path)
    result = run_script("tutorial_4_4.py", cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT), "TUTORIAL_EPOCHS": "3"})
    assert result.returncode == 0, result.stderr
    assert "Finished Training" in result.stdout and "valid accuracy" in result.stdout
    log_dir = tmp_path / "Result" / "hist_grad_weight"
    assert histogram_steps(load_events(log_dir)) == {tag: [0, 1, 2] for tag in TAGS}
    assert (log_dir / "Confusion_Matrixvalid.png").is_file()
