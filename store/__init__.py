"""The LMDB run store."""

from store.lmdb_store import SCHEMA_VERSION, RunStore, SchemaError, StoreError, StoreLocked

__all__ = ["SCHEMA_VERSION", "RunStore", "SchemaError", "StoreError", "StoreLocked"]
