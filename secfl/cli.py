"""The ``secfl`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from secfl.errors import SecflError

_DESCRIPTION = """\
secfl: privacy-hardened federated learning.

commands:
  run     run one federated experiment from a YAML config; writes a run directory with
          config.yaml, metrics.json, events.jsonl, model.safetensors, report.html and a
          checkpoint that `secfl run CONFIG --resume DIR` continues from after a crash
  audit   verify a run directory's signed, hash-chained audit log and the clients' receipts
          against the server's public key (--server-key), and print the privacy ledger
  bench   run a performance benchmark and write its JSON (ratios against a baseline
          measured in the same run); `secfl bench --list` names them
  attack  run the attack-evaluation suite of a threat model against a config; writes
          attack_report.json and attack_report.html (docs/auditor_guide.md)
  keys / serve / join / decryptor
          real deployment over gRPC with mutual TLS (docs/deployment.md)
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secfl", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a federated experiment",
        description="Run the federated experiment CONFIG.yaml describes.",
    )
    run.add_argument("config", metavar="CONFIG.yaml", help="run configuration (YAML)")
    run.add_argument("--out", metavar="DIR", help="run directory (default runs/NAME-SEED)")
    run.add_argument("--rounds", type=int, metavar="N", help="override the config's rounds")
    run.add_argument("--seed", type=int, metavar="S", help="override the config's seed")
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint (same config required)",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    audit = sub.add_parser(
        "audit",
        help="verify a run's audit trail and print its privacy ledger",
        description="Verify RUN_DIR's audit log (hash chain, Ed25519 signatures, head) and the "
        "clients' receipts against the server public key in --server-key, name every record "
        "that is altered, missing, reordered or wrongly signed, and print the privacy ledger. "
        "Exit 0: verified; 1: a problem was found; 3: no --server-key (UNVERIFIED); 2: error.",
    )
    audit.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    audit.add_argument(
        "--server-key",
        metavar="PATH",
        help="the server's Ed25519 public key (PEM or 64 hex digits), obtained from the "
        "server's operator, never from the run directory",
    )
    audit.add_argument("--json", action="store_true", help="print the result and ledger as JSON")

    attack = sub.add_parser(
        "attack",
        help="run the attack-evaluation suite",
        description="Run what the threat model's adversary can do against CONFIG.yaml and "
        "check its guarantees; writes attack_report.json and attack_report.html to --out.",
    )
    attack.add_argument("config", metavar="CONFIG.yaml", help="run configuration (YAML)")
    attack.add_argument(
        "--threat-model", required=True, metavar="FILE", help="threat_models/NAME.yaml"
    )
    attack.add_argument("--out", required=True, metavar="DIR", help="a new report directory")
    attack.add_argument("--quick", action="store_true", help="fewer repetitions and trials")
    attack.add_argument("--no-progress", action="store_true", help="say nothing while running")

    bench = sub.add_parser(
        "bench",
        help="run a performance benchmark",
        description="Run benchmark NAME and write its JSON to --out.",
    )
    bench.add_argument("name", nargs="?", metavar="NAME", help="benchmark name")
    bench.add_argument("--out", metavar="FILE.json", help="where to write the JSON")
    bench.add_argument(
        "--quick", action="store_true", help="fewer repeats and seeds, same sizes and keys"
    )
    bench.add_argument(
        "--smoke", action="store_true", help="tiny sizes for tests; figures are not gated"
    )
    bench.add_argument("--list", action="store_true", help="list the benchmarks")
    from secfl.deploy.commands import add_deploy_parsers

    add_deploy_parsers(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from secfl.config import load_config
    from secfl.runner import run

    config = load_config(args.config)
    overrides: dict[str, object] = {}
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    if args.seed is not None:
        overrides["seed"] = args.seed
    if overrides:
        config = config.with_overrides(**overrides)
    out = args.resume or args.out
    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise SecflError("--resume DIR continues in DIR; do not also give a different --out")
    result = run(config, out, resume=bool(args.resume), progress=not args.no_progress)
    final = result.history[-1] if result.history else {}
    if result.stopped:
        print(f"run stopped early: {result.stopped}")
    print(
        f"run directory: {result.out_dir}\n"
        f"rounds: {len(result.history)}  accuracy: {final.get('accuracy', float('nan')):.4f}  "
        f"loss: {final.get('loss', float('nan')):.4f}"
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from secfl.bench import available_benchmarks, run_benchmark

    if args.list or not args.name:
        for name, summary in available_benchmarks().items():
            print(f"{name:12s} {summary}")
        return 0
    if not args.out:
        raise SecflError("secfl bench needs --out FILE.json")
    report = run_benchmark(args.name, out=Path(args.out), quick=args.quick, smoke=args.smoke)
    gated = {k: v for k, v in report.items() if not isinstance(v, dict | list)}
    for key, value in gated.items():
        print(f"{key}: {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "audit":
            from secfl.audit.verify import audit_command

            return audit_command(
                Path(args.run_dir), server_key_path=args.server_key, as_json=args.json
            )
        if args.command == "attack":
            from secfl.attack_suite.cli import attack_command

            return attack_command(args)
        from secfl.deploy.commands import DEPLOY_COMMANDS, run_deploy_command

        if args.command in DEPLOY_COMMANDS:
            return run_deploy_command(args)
        return _cmd_bench(args)
    except SecflError as exc:
        print(f"secfl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; `secfl run CONFIG --resume DIR` continues", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
