"""The failures a user can fix. Their messages say what was wrong and how to fix it; the command
line prints them as they are (exit code 2) and keeps tracebacks for real bugs."""


class ObliviateError(RuntimeError):
    """A refused operation: bad input, a busy store, a store or ledger that does not check out."""


class StoreIntegrityError(ObliviateError):
    """The store's files or ledger do not match what the ledger recorded."""


class LedgerError(StoreIntegrityError):
    """The ledger database cannot be trusted: damaged, not ours, or signed with another key."""


class StoreLocked(ObliviateError):
    """Another process holds the store's lock."""


# What the command line reports as a message: ours, bad values, and files that are missing or in the way.
USER_ERRORS = (ObliviateError, ValueError, OSError)
