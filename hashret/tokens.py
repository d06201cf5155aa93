"""The one rule for reading a bearer token, shared by `hashret serve`, `hashret query` and the soak.

A token file holds the token on its first non-empty line, with surrounding whitespace stripped
(editors add a trailing newline; a blank first line is harmless). More than one non-empty line
is refused rather than guessed at: a second line is either a mistake (two tokens pasted, a
comment) or part of the token, and a token with a line break in it could never be sent in an
`authorization` header, so a server started with it would refuse every write with no hint why.
Characters outside printable ASCII are refused for the same reason.
"""
from __future__ import annotations

import os
from pathlib import Path

from hashret.errors import BadInput, MissingArtifact

TOKEN_ENV = "HASHRET_TOKEN"


def parse_token(text: str, what: str) -> str:
    """The token in `text` (its one non-empty line, stripped); BadInput naming `what` otherwise."""
    lines = [line.strip() for line in text.splitlines()]
    filled = [(n, line) for n, line in enumerate(lines, 1) if line]
    if not filled:
        raise BadInput(f"{what} | is empty: put the token on its first line")
    if len(filled) > 1:
        where = ", ".join(str(n) for n, _ in filled[:5]) + (", ..." if len(filled) > 5 else "")
        raise BadInput(f"{what} | holds {len(filled)} non-empty lines ({where}) but a token is one line: "
                       "keep only the token in it")
    n, token = filled[0]
    bad = next((i for i, ch in enumerate(token) if not " " <= ch <= "~"), None)
    if bad is not None:
        raise BadInput(f"{what} | line {n} holds {token[bad]!r} at column {bad + 1}, which an authorization "
                       "header cannot carry: use printable ASCII only")
    return token


def read_token_file(path: str | os.PathLike, flag: str = "--token-file") -> str:
    """The token in a file, by `parse_token`'s rule; errors name `flag` and the path."""
    p = Path(path)
    if not p.is_file():
        raise MissingArtifact(f"{flag} {p} | not found: give the file that holds the token")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{flag} {p} | is not UTF-8 text: put the token there as one line of ASCII") from None
    except OSError as e:
        raise MissingArtifact(f"{flag} {p} | cannot be read ({e.strerror}): check its permissions") from None
    return parse_token(text, f"{flag} {p}")


def load_token(token_file: str | os.PathLike | None, env: str = TOKEN_ENV,
               flag: str = "--token-file") -> str | None:
    """`token_file`'s token, else $HASHRET_TOKEN's (same rule; unset or blank: None)."""
    if token_file:
        return read_token_file(token_file, flag)
    value = os.environ.get(env, "")
    return parse_token(value, f"${env}") if value.strip() else None
