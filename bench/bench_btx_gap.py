"""Where a BTX merge loses against its experts: each expert with one component of the merge put in its place.

    python bench/bench_btx_gap.py --world /tmp/btxworld [--non-ffn regmean++]

For each domain d, the held-out loss of expert d on its own domain (the best the merge can hope for there),
then of expert d with one group of the merge's non-FFN tensors in place of its own (the embedding, every
layer's attention, the norms, the head, all of them), and of the merge that keeps expert d's own non-FFN
(`--non-ffn d`, calibrated routers: what the routing and the mixing of experts cost alone). The merge is
`surgery merge` with calibrated routers and the given `--non-ffn` (default: regmean++), without the head fit.
Prints one table: loss per domain, and the cost of each swap over the expert's own loss.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench_btx import DOMAINS, Evaluator, surgery_merge
from common import markdown_table

GROUPS = {  # the merge's tensors that replace the expert's own (names shared by the Llama and the Mixtral)
    "embedding": lambda name: "embed_tokens" in name,
    "attention (every layer)": lambda name: ".self_attn." in name,
    "norms (every layer and the final one)": lambda name: "norm" in name,
    "head": lambda name: name.startswith("lm_head"),
    "whole non-FFN": lambda name: ".mlp." not in name,
}


def swapped(expert, merged_state: dict, pick) -> None:
    """Expert `expert` with the tensors `pick` selects taken from the merge, in place."""
    import torch

    with torch.no_grad():
        for name, value in expert.state_dict().items():
            if pick(name):
                value.copy_(merged_state[name])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a world built by scripts/build_btx_world.py")
    parser.add_argument("--non-ffn", default="regmean++", help="the merge's --non-ffn (default: regmean++)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from surgery.execution.loading import load_model

    torch.set_num_threads(args.threads)
    world = Path(args.world)
    evaluator = Evaluator(world, args.eval_tokens)
    work = Path(tempfile.mkdtemp(prefix="bench-btx-gap-"))
    try:
        surgery_merge(world, work / "merge", init="calibrated", non_ffn=args.non_ffn)
        merged_state = load_model(work / "merge", "cpu", "float32").state_dict()
        rows: dict[str, dict[str, float]] = {"expert alone": {}}
        for domain in DOMAINS:
            expert = load_model(world / domain, "cpu", "float32")
            own = {name: value.clone() for name, value in expert.state_dict().items()}
            rows["expert alone"][domain] = evaluator.losses(expert)[domain]
            for label, pick in GROUPS.items():
                expert.load_state_dict(own)
                swapped(expert, merged_state, pick)
                rows.setdefault(f"expert + the merge's {label}", {})[domain] = evaluator.losses(expert)[domain]
            surgery_merge(world, work / domain, init="calibrated", non_ffn=domain)
            rows.setdefault("the merge with the expert's own non-FFN (--non-ffn DOMAIN)", {})[domain] = \
                evaluator.of_path(work / domain)[domain]
            shutil.rmtree(work / domain)
            print(f"  {domain} done", file=sys.stderr, flush=True)
        rows[f"the merge (--non-ffn {args.non_ffn})"] = {d: evaluator.of_path(work / "merge")[d] for d in DOMAINS}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    alone = rows["expert alone"]
    table = [[label] + [f"{losses[d]:.3f} ({losses[d] - alone[d]:+.3f})" for d in DOMAINS]
             for label, losses in rows.items()]
    print(f"## Where the merge (--non-ffn {args.non_ffn}, calibrated routers) loses, per domain\n")
    print(markdown_table(["model, on each domain's held-out text", *DOMAINS], table))
    print(f"\nHeld-out loss (nats/token) on {args.eval_tokens} tokens per domain of {world}; in brackets the cost "
          "over the domain's expert alone. Each column is the domain's own expert, changed as the row says.")


if __name__ == "__main__":
    main()
