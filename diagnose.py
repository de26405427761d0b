"""Diagnose any TensorBoard log folder: `python diagnose.py Result`, the same as the `diagnose` command.

python diagnose.py Result                 # every run under Result
python diagnose.py Result/my-run --json   # one run, findings as JSON
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the libraries load ends quietly (an exception there can abort in C++)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    from gradwatch.cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
