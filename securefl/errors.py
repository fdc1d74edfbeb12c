"""The few exception types securefl raises.

User errors (a bad config, a missing dataset folder, an impossible partition) are
:class:`SecureFLError` subclasses; the CLI prints their message on one line and exits
non-zero without a traceback.  Every cryptographic failure, whatever check failed, is the
single opaque :class:`ProtocolAbort`: an attacker must learn nothing from which check
tripped, so the detail goes to the operator's log, never into the exception text.
"""

from __future__ import annotations

import logging

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "DataError",
    "MessageError",
    "ProtocolAbort",
    "RunFailed",
    "SecureFLError",
]

_log = logging.getLogger("securefl.security")


class SecureFLError(Exception):
    """Base class of every error securefl raises on purpose."""


class ConfigError(SecureFLError, ValueError):
    """A configuration file or value is invalid; the message names file, table and field."""


class DataError(SecureFLError):
    """A dataset is missing, malformed, or cannot be partitioned as asked."""


class MessageError(SecureFLError):
    """A message could not be decoded or failed validation (malformed, wrong type, too big)."""


class RunFailed(SecureFLError):
    """The work asked for could not be done (the CLI exits 1, not 2): e.g. a server whose
    sites never connected."""


class BudgetExceeded(SecureFLError):
    """A privacy charge would take a client past its budget; nothing was committed."""


class ProtocolAbort(SecureFLError):
    """A cryptographic protocol step failed.

    The message is deliberately constant.  Construct it with :meth:`because`, which logs the
    operator-facing ``detail`` on the ``securefl.security`` logger and returns the opaque error.
    """

    MESSAGE = "cryptographic protocol aborted"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)

    @classmethod
    def because(cls, detail: str) -> ProtocolAbort:
        _log.warning("protocol abort: %s", detail)
        return cls()
