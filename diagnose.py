"""Diagnose any TensorBoard log folder: `python diagnose.py Result`, the same as the `diagnose` command.

python diagnose.py Result                 # every run under Result
python diagnose.py Result/my-run --json   # one run, findings as JSON
"""

import sys

if __name__ == "__main__":
    from gradwatch.command import diagnose  # Ctrl-C while the libraries load ends quietly

    sys.exit(diagnose())
