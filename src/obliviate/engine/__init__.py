"""The continual engine: requests, the ledger and the model store."""

from ..errors import LedgerError, StoreIntegrityError, StoreLocked
from .ledger import Head, Ledger, LedgerState
from ..request import RegularizerSpec, Request
from .store import ApplyOutcome, Store

__all__ = ["ApplyOutcome", "Head", "Ledger", "LedgerError", "LedgerState", "RegularizerSpec", "Request", "Store",
           "StoreIntegrityError", "StoreLocked"]
