"""The ledger (SQLAlchemy) and the file store: the node's source of truth."""
