"""CLI conventions: fast help, one-line errors with exit code 2, no tracebacks."""

import subprocess
import sys

from tiny_models import save_model


def test_help_does_not_import_torch():
    code = ("import sys; from surgery.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'transformers' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "upcycle" in result.stdout or "copy" in result.stdout


def test_bad_input_is_one_line_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "surgery", "inspect", str(tmp_path / "nothing")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"surgery: error: {tmp_path / 'nothing'}: no such file or directory"]
    assert "Traceback" not in result.stderr


def test_verbose_shows_the_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "surgery", "-v", "inspect", str(tmp_path / "nothing")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_unknown_option_is_a_one_line_usage_error(tmp_path, run_cli):
    code, _, err = run_cli("copy", tmp_path, tmp_path / "o", "--no-such-option")
    assert code == 2
    assert err.strip().splitlines() == ["surgery: error: No such option '--no-such-option' "
                                        "(see 'surgery copy --help')"]


def test_a_value_outside_a_choice_is_a_one_line_usage_error(tmp_path, run_cli):
    code, _, err = run_cli("upcycle", tmp_path, tmp_path / "o", "-n", "4", "-k", "2", "--router-init", "hash")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("surgery: error: Invalid value for '--router-init': 'hash' is not one of")
