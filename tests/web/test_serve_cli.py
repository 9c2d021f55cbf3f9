"""`openldm serve` with no flags but a port: the bundled model answers on 127.0.0.1; bad flags are one line, exit 2."""
import json
import socket
import subprocess
import sys
import time
import urllib.request

from openldm.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_then_stops():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "openldm.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=2) as r:
                    models = json.load(r)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
                time.sleep(0.2)
        assert [m["title"] for m in models] == ["fashion_mnist", "emoji"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_bad_serve_flags_are_one_line(tmp_path, capsys):
    assert main(["serve", "--api-auth", "nocolon"]) == 2
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", str(tmp_path)]) == 2  # a folder with no models
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "USER:PASS" in errors[0] and "missing" in errors[1] and "no models" in errors[2]
