"""The continual engine: requests, the ledger and the model store."""

from .ledger import Ledger, LedgerCorrupted, LedgerState
from .lock import StoreLocked
from .request import RegularizerSpec, Request
from .store import ApplyOutcome, Store, StoreIntegrityError

__all__ = ["ApplyOutcome", "Ledger", "LedgerCorrupted", "LedgerState", "RegularizerSpec", "Request", "Store",
           "StoreIntegrityError", "StoreLocked"]
