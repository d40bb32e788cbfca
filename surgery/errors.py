"""The one error type for user-facing failures.

Anything the user can fix (bad input files, bad options, an existing output) raises
``SurgeryError`` with a one-line message naming the file, the tensor and what was expected
versus what was found. The CLI prints it as ``surgery: error: <message>`` and exits with 2.
"""


class SurgeryError(Exception):
    """A failure caused by the user's input or options; its message is shown as one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def check_choice(option: str, value, choices) -> None:
    """The one refusal of an option value outside its choices (the Python API passes values click never saw)."""
    if value not in choices:
        raise SurgeryError(f"{option} {value!r}: expected one of {', '.join(map(str, choices))}")
