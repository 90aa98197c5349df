"""The continual engine: requests, the ledger and the model store."""

from .ledger import Ledger, LedgerState
from .lock import StoreLocked
from ..request import RegularizerSpec, Request
from .store import ApplyOutcome, Store, StoreIntegrityError

__all__ = ["ApplyOutcome", "Ledger", "LedgerState", "RegularizerSpec", "Request", "Store",
           "StoreIntegrityError", "StoreLocked"]
