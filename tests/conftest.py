import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "examples" / "demo-llama"


@pytest.fixture
def run_cli(capsys):
    """Run `surgery ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from surgery.cli import main

    def run(*args):
        capsys.readouterr()  # what the test printed before (building its fixtures) is not the command's
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def token_file(tmp_path):
    """Calibration token ids for the tiny models (they have no tokenizer): 8 rows of 40 seeded ids."""
    import json

    import torch

    generator = torch.Generator().manual_seed(3)
    path = tmp_path / "calibration.jsonl"
    path.write_text("".join(json.dumps(torch.randint(3, 96, (40,), generator=generator).tolist()) + "\n"
                            for _ in range(8)))
    return path


@pytest.fixture
def moe(tmp_path, run_cli):
    """make(family, layout="per-expert", **config overrides): a tiny transformers-built MoE of `family`, stored in
    `layout` (through `surgery copy --layout`)."""
    from tiny_models import save_model

    def make(family, layout="per-expert", **overrides):
        source = save_model(tmp_path / f"{family}-hf", family, **overrides)
        out = tmp_path / f"{family}-{layout}"
        code, _, err = run_cli("copy", source, out, "--layout", layout)
        assert code == 0, err
        return out
    return make
