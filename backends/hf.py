"""What the transformers-based backends share."""

from __future__ import annotations

import threading

# transformers resolves its names lazily and that is not thread-safe: two worker threads
# importing at once can see "cannot import name 'AutoTokenizer'". Every load takes this lock.
LOAD_LOCK = threading.Lock()
