"""``sightline auth``: make bearer tokens and their tokens-file entries, hash a token, print the role table.

The server stores only a token's SHA-256 (see docs/security.md), so a token is shown once, when it is made, and
nowhere else: ``sightline auth new-token alice --role reviewer >> tokens.yaml`` appends the entry to the tokens file
and shows the token on the terminal (standard error) for its holder.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("auth", help="bearer tokens and roles of the gRPC APIs")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser("new-token", help="make a token for a principal and print its tokens-file entry")
    new.add_argument("principal", help="who holds the token, e.g. alice or svc:kiosk-gate-3")
    new.add_argument(
        "--role",
        action="append",
        required=True,
        dest="roles",
        choices=("enroller", "reviewer", "auditor", "operator"),
        help="a role (repeatable)",
    )
    new.set_defaults(func=cmd_new_token)
    hashed = actions.add_parser("hash-token", help="print the token_sha256 of a token read from standard input")
    hashed.set_defaults(func=cmd_hash_token)
    methods = actions.add_parser("methods", help="print every gRPC method and the roles that may call it (Markdown)")
    methods.set_defaults(func=lambda args: print(_auth().method_table_markdown(), end="") or 0)


def _auth():  # type: ignore[no-untyped-def]
    from sightline.common import auth

    return auth


def cmd_new_token(args: argparse.Namespace) -> int:
    auth = _auth()
    token = auth.new_token()
    entry = auth.Principal(args.principal, frozenset(auth.Role(r) for r in args.roles), auth.hash_token(token))
    try:
        auth.parse_principals(auth.dump_principals([entry]), "the new entry")  # the file's own rules
    except auth.TokensFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The entry goes to stdout, so `... >> tokens.yaml` appends it; the token to the terminal, once.
    print(f"token of {args.principal} (hand it over now; only its hash is kept):\n{token}", file=sys.stderr)
    print(auth.dump_principals([entry]), end="")
    return 0


def cmd_hash_token(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        print(
            'error: no token on standard input (e.g. `printf %s "$TOKEN" | sightline auth hash-token`)', file=sys.stderr
        )
        return 2
    if len(token) < 32:
        print(
            "warning: a token shorter than 32 characters is guessable; `sightline auth new-token` makes good ones",
            file=sys.stderr,
        )
    print(_auth().hash_token(token))
    return 0
