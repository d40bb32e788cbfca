"""`--verify`: what every writing command runs on OUT once it is written.

An exact operation (upcycle without noise, split at K = N with a zero router, copies merged)
is compared with its source layer by layer (``verify_exact``: the first layer whose attention,
FFN/MoE or output differs beyond float noise is named); any other is validated against its sources
and its loss change reported (``verify_written``).
"""

from __future__ import annotations

from dataclasses import replace

from surgery import console
from surgery.checks import report_view, validation  # their functions looked up at call time (tests stand in)
from surgery.checks.validation import VERIFY_TOKENS
from surgery.errors import SurgeryError
from surgery.execution.batches import batches
from surgery.execution.settings import RunSettings
from surgery.io.checkpoint import Checkpoint


def verify_exact(out_path, reference_path, settings=None, max_tokens: int = VERIFY_TOKENS,
                 rounding: str | None = None) -> dict:
    """What `--verify` runs for an exact operation: OUT against its source, layer by layer, on the
    validation sample (at most `max_tokens` tokens). Prints the comparison; raises SurgeryError naming
    the first layer that differs. `rounding`: the dtype whose rounding the operation folded into the
    weights on purpose (surgery.plan.plan.Plan.rounding), tolerated on top of float noise."""
    settings = settings or RunSettings()
    with Checkpoint.open(out_path, require_config=True) as checkpoint:
        vocab = checkpoint.config.get("vocab_size")
    sample = validation.sample_rows(out_path, [reference_path], data=None, text=None, tokens=None, batch_size=8,
                                    seq_len=256, vocab_size=vocab, max_tokens=max_tokens)
    made = list(batches(sample.rows, 8, 256, sample.pad_token_id, max_tokens, vocab))
    report = validation.compare_exact(out_path, reference_path, made, settings, rounding)
    report["sample"] = {"source": sample.source, "tokens": sum(batch.tokens for batch in made)}
    report_view.print_exact(report)
    if not report["passed"]:
        raise SurgeryError(f"{out_path} does not reproduce {reference_path}: {report['message']}")
    return report


def verify_written(out, sources, *, exact: bool, settings=None, max_tokens: int = VERIFY_TOKENS,
                   rounding: str | None = None) -> dict:
    """`--verify` of every writing command. Exact operations: OUT against its source layer by layer
    (``verify_exact``); the others: validate OUT against every source and report the loss change.
    A failure is a SurgeryError that says the output is kept and the input untouched."""
    settings = settings or RunSettings()
    sources = [str(source) for source in sources]
    if exact:
        try:
            return verify_exact(str(out), sources[0], replace(settings, dtype="auto"), max_tokens,  # float32 compare
                                rounding)
        except SurgeryError as exc:
            raise SurgeryError(f"--verify: {exc} (the output is kept for inspection; the input is untouched)") from None
    result = validation.validate(str(out), sources, device=settings.device, memory_budget=settings.memory_budget,
                                 max_tokens=max_tokens)
    report_view.print_result(result)
    reference = (result.get("references") or [{}])[0]
    if result.get("loss") is not None and reference.get("loss") is not None:
        console.info(f"verify: loss {result['loss']:.4f} vs {reference['path']} {reference['loss']:.4f} "
                     f"({result['loss'] - reference['loss']:+.4f} nats/token)")
    return result
