"""What commands print: tables that fit 80 columns, no cell cut, no third-party progress bars or warnings."""

import io
import json

import pytest
from rich.console import Console
from tiny_models import save_model


@pytest.fixture
def narrow(monkeypatch):
    """console.stdout as an 80-column terminal; returns a function giving what was printed."""
    from surgery import console

    buffer = io.StringIO()
    monkeypatch.setattr(console, "stdout", Console(file=buffer, width=80, highlight=False, soft_wrap=True,
                                                   force_terminal=False))
    return buffer.getvalue


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("output")
    deep = root / ("a-reference-directory-with-a-long-name/" * 3)
    deep.mkdir(parents=True)
    ids = root / "ids.jsonl"
    ids.write_text(json.dumps(list(range(3, 60))) + "\n" + json.dumps(list(range(10, 40))) + "\n")
    return {"mixtral": save_model(root / "mixtral", "mixtral", seed=1), "llama": save_model(deep / "llama", "llama"),
            "ids": ids}


def table_lines(text: str) -> list[str]:
    """The lines of every table: its header, the rule under it, and its rows up to the next blank line."""
    lines = text.splitlines()
    out = []
    for number, line in enumerate(lines):
        if line.strip().startswith("───"):
            out.append(lines[number - 1])
            for row in lines[number:]:
                if not row.strip():
                    break
                out.append(row)
    assert out, "no table printed"
    return out


def assert_fits(text: str) -> None:
    assert "…" not in text  # rich marks a cut cell with an ellipsis
    too_wide = [line for line in table_lines(text) if len(line) > 80]
    assert not too_wide, too_wide


def test_the_validate_report_fits_80_columns_with_a_long_reference_path(models, narrow):
    from surgery.checks.report_view import print_result
    from surgery.checks.validation import evaluate

    result = evaluate(models["mixtral"], [models["llama"]], tokens=models["ids"], device="cpu")
    print_result(result)
    text = narrow()
    assert len(str(models["llama"])) > 80
    assert_fits(text)
    assert f"ref 1: {models['llama']}" in text  # the full path, on a line of its own
    for layer in result["routing"]:
        assert f"{min(layer['share']):.2f}–{max(layer['share']):.2f}" in text and f"{layer['router_entropy']:.3f}" in text
    assert f"{result['references'][0]['mean_kl']:.4g}" in text


def test_the_layer_by_layer_comparison_fits_80_columns(models, narrow):
    from surgery.checks.post_write import verify_exact

    verify_exact(models["llama"], models["llama"])
    text = narrow()
    assert_fits(text)
    assert "verify: passed: largest relative difference 0.0e+00" in text


def test_inspect_fits_80_columns(models, narrow, run_cli):
    code, _, err = run_cli("inspect", models["mixtral"])
    assert code == 0, err
    text = narrow()
    assert_fits(text)
    assert "0-1" in text and "experts" in text  # the two identical layers on one row


def test_no_loading_progress_bars_or_transformers_warnings_in_our_output(models, run_cli, capsys):
    capsys.readouterr()
    code, out, err = run_cli("validate", models["mixtral"], "-r", models["llama"], "--tokens", models["ids"])
    assert code == 0, err
    assert "Loading weights" not in out + err and "[transformers]" not in out + err
