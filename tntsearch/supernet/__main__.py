"""``python -m tntsearch.supernet train SPEC.yaml``: train a spec's supernet once (docs/supernet.md).

Prints one line per epoch and the checkpoint path at the end; exit 2 for a bad spec (the
message names the field), 1 when the training fails.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tntsearch.supernet",
                                description="Weight-sharing TNT supernet of a spec's space (one-shot mode).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the supernet with Ray Train (the spec's supernet, data, train, "
                                     "resources and mlflow sections)")
    t.add_argument("spec", help="search spec YAML with a supernet: section")
    t.add_argument("--epochs", type=int, help="override supernet.epochs")
    t.add_argument("--stop-after", type=int, help="stop after this epoch; run again to resume")
    t.add_argument("--name", help="run name under the spec's storage (default: supernet-SPECNAME); "
                                  "an existing run of that name is resumed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tntsearch.tracking import TELEMETRY_ENV

    os.environ.update(TELEMETRY_ENV)
    try:
        from tntsearch.data import check_files
        from tntsearch.spec import load_spec
        from tntsearch.supernet.sampling import SubnetSpace

        spec = load_spec(args.spec)
        if spec.supernet is None:
            raise ValueError(f"{args.spec}: no supernet section (epochs, sampling, k, distill)")
        if args.epochs is not None:
            if args.epochs < 1:
                raise ValueError(f"--epochs must be >= 1; got {args.epochs}")
            spec = spec.model_copy(update={"supernet": spec.supernet.model_copy(update={"epochs": args.epochs})})
        if args.stop_after is not None and args.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1; got {args.stop_after}")
        SubnetSpace(spec.space)  # the largest and smallest sub-networks must be valid
        check_files(spec.data)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2

    import ray
    from ray.train import TrainingFailedError

    from tntsearch.supernet.trainer import run_supernet
    from tntsearch.trainer import failure_reason

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(TELEMETRY_ENV)})
    name = args.name or f"supernet-{spec.name}"
    print(f"training the supernet of {args.spec} ({spec.supernet.sampling}, k={spec.supernet.k}, "
          f"distill={spec.supernet.distill}) as run {name}", flush=True)
    try:
        result, run_id = run_supernet(spec, name=name, stop_epoch=args.stop_after,
                                      echo=lambda line: print(line, flush=True))
    except TrainingFailedError as e:
        print(f"training failed: {failure_reason(e)}", file=sys.stderr)
        return 1
    print(f"mlflow run: {run_id}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
