"""The operator's record of an attributable SecAgg failure: who is suspected, who saw it.

Only a failure that one party's message alone explains is attributable: a bad advertisement
or consistency signature, a reveal that does not open its signed commitment, a malformed
message, a share bundle that fails authentication.  The suspect is the party whose message
it was (for a relayed message, the server could also be at fault: the reporter says who
checked).  Unattributable failures (a reconstruction that does not match its commitment, a
decoded weight out of range) are :class:`~securefl.errors.ProtocolAbort` with no suspect.
"""

from __future__ import annotations

import logging

__all__ = ["report"]

_log = logging.getLogger("securefl.security")


def report(round: int, *, suspect: str, reporter: str, why: str) -> None:
    """Log ``suspect`` (a site id, or ``"server"``) as reported by ``reporter``."""
    _log.warning("secagg round %d: suspect %r reported by %r: %s", round, suspect, reporter,
                 why)
