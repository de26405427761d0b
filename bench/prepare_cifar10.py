"""Time converting a full-size CIFAR-10 archive (50,000 + 10,000 images) with prepare_data.py, then stats.

    python bench/prepare_cifar10.py               # builds a synthetic archive in a temporary folder

The archive has the official layout and size but random pixels (this machine cannot download the real
one); random 32x32 PNGs compress worse than photographs, so the real archive converts a little faster.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import make_cifar_archive  # noqa: E402

import prepare_data  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        archive, _ = make_cifar_archive(tmp, per_batch=10_000, test_size=10_000)
        print(f"built {archive.stat().st_size / 2**20:.0f} MiB archive in {time.perf_counter() - start:.1f} s")
        times = []
        for run in range(2):
            start = time.perf_counter()
            assert prepare_data.main(["cifar10", "--archive", str(archive), "--out", f"{tmp}/out{run}"]) == 0
            times.append(time.perf_counter() - start)
        print(
            f"convert 60,000 images: {', '.join(f'{t:.1f} s' for t in times)} "
            f"(median {statistics.median(times):.1f} s, {60_000 / statistics.median(times):,.0f} images/s)"
        )
        start = time.perf_counter()
        assert prepare_data.main(["stats", f"{tmp}/out0"]) == 0
        print(f"stats over the 50,000 training images: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
