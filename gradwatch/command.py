"""The `diagnose` console command. Ctrl-C while it starts ends it quietly with status 130, as
later: until the reader's modules are loaded, SIGINT exits at once (an exception raised inside an
import can abort in C++ code), then it is Python's KeyboardInterrupt, which `cli.main` turns into
130."""

import os
import signal


def diagnose() -> int:
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    from .cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    return main()
