"""Run mergekit-moe on several configs in one process (imports once): run with mergekit's own Python.

    /tmp/mk/bin/python tests/mergekit_driver.py RESULTS.json CONFIG OUT [CONFIG OUT ...]

Each config runs as ``mergekit-moe CONFIG OUT --device cpu --i-understand-this-is-not-useful-without-training``
would, in the config's directory (mergekit reads relative model paths from the working directory).
RESULTS.json: {config: "ok" or the error it ended with}. Imports nothing from surgery (another virtualenv).
"""

import json
import os
import sys
import traceback


def main(results_path, pairs):
    import yaml
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    results = {}
    start = os.getcwd()
    for config_path, out_path in pairs:
        os.chdir(os.path.dirname(os.path.abspath(config_path)))
        try:
            with open(config_path, encoding="utf-8") as handle:
                config = MoEMergeConfig.model_validate(yaml.safe_load(handle))
            build(config, out_path, MergeOptions(device="cpu", quiet=True), device="cpu", allow_all_same=True)
            results[config_path] = "ok"
        except SystemExit as exc:
            results[config_path] = f"exit {exc.code}"
        except Exception as exc:  # noqa: BLE001 - every failure is a result here
            last = traceback.extract_tb(exc.__traceback__)[-1]
            results[config_path] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} " \
                                   f"({os.path.basename(last.filename)}:{last.lineno})"
        finally:
            os.chdir(start)
    with open(results_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    arguments = sys.argv[2:]
    main(sys.argv[1], list(zip(arguments[::2], arguments[1::2])))
