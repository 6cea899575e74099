"""presenced: a standalone presence daemon for Rocket.Chat.

This package owns the daemon. It must never import ``presenced.testing`` (the MongoDB
emulator and traffic simulator), which is an optional extra for tests and the demo.
"""

__version__ = "0.1.0"
