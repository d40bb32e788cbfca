"""Failures from the environment: a full disk, signals mid-write, unwritable or existing outputs.
Each leaves no output that looks complete and never touches the input."""

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from tiny_models import save_model


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def leftovers(parent, keep=("src",)):
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_disk_full_during_the_write_fails_cleanly(tmp_path):
    source = save_model(tmp_path / "src", "llama")
    before = digest(source)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    result = subprocess.run([sys.executable, "-m", "surgery", "copy", str(source), str(tmp_path / "out")],
                            capture_output=True, text=True, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("surgery: error: ") and "File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(tmp_path) == [] and digest(source) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_removes_the_partial_output(tmp_path, signum):
    source = save_model(tmp_path / "src", "llama")
    before = digest(source)
    # --dtype bf16 computes every tensor (torch is imported after the temp dir exists), a wide window
    process = subprocess.Popen([sys.executable, "-m", "surgery", "copy", str(source), str(tmp_path / "out"),
                                "--dtype", "bf16"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.surgery-tmp") for p in tmp_path.iterdir()):
        assert process.poll() is None and time.time() < deadline, "the write never started"
        time.sleep(0.005)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr and "Traceback" not in stderr
    assert leftovers(tmp_path) == [] and digest(source) == before


def test_unwritable_output_location_is_refused(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    code, _, err = run_cli("copy", source, "/proc/surgery-output")
    assert code == 2 and err.splitlines()[-1].startswith("surgery: error: /proc/surgery-output: cannot create a directory beside it")
