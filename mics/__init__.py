"""mics: Mentor-Intern Collaborative Search as an asyncio engine over an LMDB tree store.

Flow: cli -> mics.run (store, config, models) -> mics.engine (per-question search) ->
mics.policy (pure rules) + backends (models through one call gate) + store (LMDB).
"""

__version__ = "0.1.0"
