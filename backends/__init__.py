"""Model backends: the ChatModel / RolloutModel protocols, implementations and the call gate."""

from backends.base import (
    BackendError,
    Call,
    ChatModel,
    PermanentError,
    RolloutModel,
    TransientError,
)
from backends.registry import build_chat, build_rollout

__all__ = [
    "BackendError",
    "Call",
    "ChatModel",
    "PermanentError",
    "RolloutModel",
    "TransientError",
    "build_chat",
    "build_rollout",
]
