"""`python -m loraserve.auth new-token --role tenant --tenant acme --name acme-app` prints a fresh
token and the token-file entry to add; `python -m loraserve.auth hash` prints a token's sha256."""

from __future__ import annotations

import argparse
import json
import sys

from loraserve.auth.tokens import ROLES, TokenTable, hash_token, new_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-token", help="print a new random token and its token-file entry")
    new.add_argument("--role", choices=ROLES, required=True)
    new.add_argument("--tenant", default="", help="the tenant's name (role tenant)")
    new.add_argument("--replica", default="", help="the replica id a service token acts as (role service)")
    new.add_argument("--name", default="", help="a label for logs")
    hashed = sub.add_parser("hash", help="print the sha256 of a token read from stdin")
    hashed.set_defaults(role=None)
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(hash_token(sys.stdin.readline().strip()))
        return 0
    token = new_token()
    entry = {
        "name": args.name or args.tenant or args.replica or args.role,
        "role": args.role,
        "sha256": hash_token(token),
    }
    if args.tenant:
        entry["tenant"] = args.tenant
    if args.replica:
        entry["replica"] = args.replica
    try:
        TokenTable.from_dict({"tokens": [entry]}, "new entry")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"token (give it to the caller; it is not stored): {token}")
    print(f"token-file entry: {json.dumps(entry)}")
    return 0
