"""Command-line parsers and handlers of ``secfl keys / serve / join / decryptor``.

Kept here so that :mod:`secfl.cli` only registers them; gRPC is imported when a command
runs, not when ``secfl --help`` builds its parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEPLOY_COMMANDS = ("keys", "serve", "join", "decryptor")

DESCRIPTION = """\
  keys       make the federation's CA, party certificates (role in the certificate) and
             revocation list: `secfl keys init --out PKI --clients N`, `issue`, `revoke`
  serve      run the server of a deployment (gRPC, mutual TLS; clients dial in)
  join       run one client of a deployment: `secfl join CONFIG --server HOST:PORT ...`
  decryptor  run the CKKS decryptor of a deployment (holds the secret key)
"""


def _party_args(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument(
        "--pki",
        metavar="DIR",
        help=f"PKI directory from `secfl keys init`: uses DIR/{default_name}/ and DIR/federation/",
    )
    parser.add_argument("--credentials", metavar="DIR", help="this party's own key directory")
    parser.add_argument("--federation", metavar="DIR", help="the public bundle (ca, crl, certs)")


def add_deploy_parsers(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="federation certificates and revocation list",
        description="Create the federation's CA and party certificates, issue more, revoke.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    init = keys_sub.add_parser("init", help="new CA, server, clients, decryptor, empty CRL")
    init.add_argument("--out", required=True, metavar="DIR")
    init.add_argument("--clients", required=True, type=int, metavar="N")
    init.add_argument("--no-decryptor", action="store_true", help="masking-only federation")
    init.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="server DNS name or IP clients dial (repeatable; default localhost, 127.0.0.1)",
    )
    issue = keys_sub.add_parser("issue", help="issue (or re-issue) one party's certificate")
    issue.add_argument("--pki", required=True, metavar="DIR")
    issue.add_argument("--role", required=True, choices=("server", "client", "decryptor"))
    issue.add_argument("--id", required=True, type=int, dest="party_id")
    issue.add_argument("--host", action="append", metavar="NAME")
    revoke = keys_sub.add_parser("revoke", help="revoke every certificate of a party")
    revoke.add_argument("--pki", required=True, metavar="DIR")
    revoke.add_argument("name", metavar="PARTY", help="e.g. client-3")

    serve = sub.add_parser(
        "serve",
        help="run a deployment's server",
        description="Serve the federated run CONFIG.yaml to clients that dial in over gRPC "
        "with mutual TLS. Restarted with the same --out after a crash, it resumes.",
    )
    serve.add_argument("config", metavar="CONFIG.yaml")
    serve.add_argument("--out", required=True, metavar="DIR", help="run directory")
    serve.add_argument("--listen", default="0.0.0.0:7443", metavar="HOST:PORT")
    serve.add_argument("--port-file", metavar="FILE", help="write the bound port here")
    serve.add_argument("--wait-clients", type=int, metavar="N", help="default: all registered")
    serve.add_argument("--connect-timeout", type=float, default=300.0, metavar="S")
    serve.add_argument("--stage-timeout", type=float, default=120.0, metavar="S")
    _party_args(serve, "server-0")

    join = sub.add_parser(
        "join",
        help="run one client of a deployment",
        description="Join the federated run CONFIG.yaml served at --server as the client "
        "named by the certificate.",
    )
    join.add_argument("config", metavar="CONFIG.yaml")
    join.add_argument("--server", required=True, metavar="HOST:PORT")
    join.add_argument("--state", required=True, metavar="DIR", help="client state (share log)")
    join.add_argument("--data", metavar="FILE.npz", help="this client's records (x, y)")
    join.add_argument("--deadline", type=float, default=300.0, metavar="S")
    _party_args(join, "client-N")

    decryptor = sub.add_parser(
        "decryptor",
        help="run the CKKS decryptor of a deployment",
        description="Hold the CKKS secret key for the run CONFIG.yaml and answer the server "
        "at --server under the decryptor policy.",
    )
    decryptor.add_argument("config", metavar="CONFIG.yaml")
    decryptor.add_argument("--server", required=True, metavar="HOST:PORT")
    decryptor.add_argument("--out", required=True, metavar="DIR")
    decryptor.add_argument("--deadline", type=float, default=300.0, metavar="S")
    _party_args(decryptor, "decryptor-0")


def _dirs(args: argparse.Namespace, default_name: str) -> tuple[Path, Path]:
    from secfl.errors import ConfigError

    pki = Path(args.pki) if args.pki else None
    credentials = Path(args.credentials) if args.credentials else None
    federation = Path(args.federation) if args.federation else None
    if credentials is None:
        if pki is None or "N" in default_name:
            raise ConfigError(f"secfl {args.command} needs --credentials DIR (or --pki DIR)")
        credentials = pki / default_name
    if federation is None:
        federation = pki / "federation" if pki is not None else credentials.parent / "federation"
    return credentials, federation


def run_deploy_command(args: argparse.Namespace) -> int:
    from secfl.config import load_config

    if args.command == "keys":
        from secfl.deploy import pki

        if args.keys_command == "init":
            hosts = tuple(args.host) if args.host else ("localhost", "127.0.0.1")
            folder = pki.init_pki(
                args.out, clients=args.clients, decryptor=not args.no_decryptor, hosts=hosts
            )
            print(f"PKI written to {folder}: keep {folder}/ca offline; give each party its own")
            print(f"directory ({folder}/server-0, {folder}/client-0, ...) and {folder}/federation")
        elif args.keys_command == "issue":
            path = pki.issue(args.pki, args.role, args.party_id, hosts=tuple(args.host or ()))
            print(f"issued {path}; federation/certs updated")
        else:
            revoked = pki.revoke(args.pki, args.name)
            print(f"revoked {args.name}; federation/crl.pem lists {len(revoked)} serial(s)")
        return 0
    config = load_config(args.config)
    if args.command == "serve":
        from secfl.deploy.serve import ServeOptions, serve

        credentials, federation = _dirs(args, "server-0")
        history = serve(
            config,
            credentials_dir=credentials,
            federation_dir=federation,
            out_dir=args.out,
            options=ServeOptions(
                listen=args.listen,
                wait_clients=args.wait_clients,
                connect_timeout_s=args.connect_timeout,
                stage_timeout_s=args.stage_timeout,
                port_file=Path(args.port_file) if args.port_file else None,
            ),
        )
        final = history[-1] if history else {}
        print(
            f"run directory: {args.out}  rounds: {len(history)}  "
            f"accuracy: {final.get('accuracy', float('nan')):.4f}"
        )
        return 0
    if args.command == "join":
        from secfl.deploy.join import join

        credentials, federation = _dirs(args, "client-N")
        reason = join(
            config,
            server=args.server,
            credentials_dir=credentials,
            federation_dir=federation,
            state_dir=args.state,
            data_file=args.data,
            deadline_s=args.deadline,
        )
        print(f"server said goodbye: {reason}")
        return 0
    from secfl.deploy.join import run_decryptor

    credentials, federation = _dirs(args, "decryptor-0")
    reason = run_decryptor(
        config,
        server=args.server,
        credentials_dir=credentials,
        federation_dir=federation,
        out_dir=args.out,
        deadline_s=args.deadline,
    )
    print(f"server said goodbye: {reason}")
    return 0
