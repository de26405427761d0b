"""Retake README's screenshots: train the sample run, serve it with TensorBoard, photograph it headless.

apt-get install chromium          # Debian's package; the script calls /usr/bin/chromium
python tools/screenshots.py       # writes docs/*.png (about a minute)
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VIEWS = {  # file name: TensorBoard URL fragment; one per tab, in the order of TensorBoard's tab bar
    "time_series.png": "#timeseries",
    "scalars.png": "#scalars",
    "images.png": "#images",
    "text.png": "#text",
    "histograms.png": "#histograms&tagFilter=conv1.weight_grad%7Cfc3.bias_data",
    "distributions.png": "#distributions&tagFilter=conv1.weight_grad%7Cfc3.bias_data",
    "hparams.png": "#hparams",
    "custom_scalars.png": "#custom_scalars",
}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def screenshot(chromium, url, path, profile):
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--use-angle=swiftshader",  # TensorBoard draws its Time Series charts with WebGL
            "--enable-unsafe-swiftshader",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            "--window-size=1920,1080",
            "--virtual-time-budget=60000",  # simulated time, in which the charts get their data and draw
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "Result"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                "--log-dir",
                str(logs),
                "--run-name",
                "sample",
                "--print-every",
                "1000",
            ],
            check=True,
            cwd=ROOT,
        )
        shutil.copy(logs / "sample" / "gradient_flow.png", args.out / "gradient_flow.png")
        port = free_port()
        tensorboard = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logs), "--host", "127.0.0.1"]
        server = subprocess.Popen(
            [*tensorboard, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            for _ in range(120):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            time.sleep(3)  # let the data server finish loading the run
            for name, fragment in VIEWS.items():
                screenshot(
                    args.chromium,
                    f"http://127.0.0.1:{port}/?forceSVG=true{fragment}",
                    args.out / name,
                    Path(tmp) / name,
                )
                print(f"wrote {args.out / name}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
