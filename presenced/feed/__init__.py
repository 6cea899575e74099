"""Feeds: MongoDB changes in, presence keys out.

Owns: turning change events and oplog entries into the keys of
:mod:`presenced.feed.keys` — "this user's sessions / this user / this instance changed", or
"reconcile everything". Every feed produces the same keys, so the loader, engine and writer
are shared.

Must never: decide a status (the engine does, from documents the loader re-reads), or block
the event loop (the blocking sources are called from worker threads only).
"""

from presenced.feed.keys import (
    PRESENCE_USER_FIELDS,
    InstancesChanged,
    Key,
    ResyncAll,
    SessionsChanged,
    UserChanged,
    touches_presence_fields,
)

__all__ = [
    "PRESENCE_USER_FIELDS",
    "InstancesChanged",
    "Key",
    "ResyncAll",
    "SessionsChanged",
    "UserChanged",
    "touches_presence_fields",
]
