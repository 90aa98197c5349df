"""The model store: versioned weights on disk plus the request ledger.

Layout of a store directory::

    store.json              format, model source and kind (written once, at init)
    base/                   the pretrained model, as saved by its bundle class
    edits/<id>.safetensors  the Edit of each applied request
    state/<id>.safetensors  method state after each applied request (running statistics, ...)
    weights/after-<id>.safetensors   the current weights (only the latest is kept)
    ledger.sqlite           the hash-chained event log
    ledger.head             the ledger's last row (sequence number and hash), rewritten at each commit
    lock                    held while anything writes

The model after request k is, by definition, ``base`` with the edits of the applied requests
replayed in order; the ledger records its hash. Every write goes to a temporary file that is
renamed into place, and the ledger row is the commit point: files that no ledger row refers to
are leftovers of an interrupted operation and are removed before the next write.

The init row records the hash of ``store.json`` and of every file under ``base/`` (configs,
tokenizer, bundle metadata, weights), so ``verify`` names any byte changed anywhere in the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..classifiers.models import ClassifierModel
from ..config import build_config, config_to_dict
from ..errors import StoreIntegrityError
from ..hashing import file_hash, folder_hashes, tensor_hash
from ..methods.base import Edit, MethodResult, UnlearningContext, get_method
from ..models.t2i import T2IModel, bundle_language
from ..models.zoo import DEFAULT_T2I
from ..regularizers import check_composition, get_regularizer
from ..request import RegularizerSpec, Request
from ..resources import PeakMemory
from ..tensors import StoredTensors
from .files import TMP_SUFFIX, atomic_save_tensors, atomic_write_text, load_tensors
from .ledger import Head, Ledger, LedgerState, derive_state, ledger_key
from .lock import exclusive_lock
from .processes import Processes

STORE_FILE = "store.json"
LEDGER_FILE = "ledger.sqlite"
HASH_CACHE = "hashes.cache"  # digests of files whose inode, size and times are unchanged; see Store._hash
FORMAT_VERSION = 2  # 2: the init row hashes every file of the base model and store.json; rows may be signed
MODEL_FAMILIES = {"t2i": T2IModel, "classifier": ClassifierModel}


def model_family(folder: Path) -> str:
    """``classifier`` for a folder saved by ClassifierModel, else ``t2i`` (obliviate T2I bundles
    and Stable Diffusion folders)."""
    bundle = folder / "obliviate.json"
    return json.loads(bundle.read_text()).get("kind", "t2i") if bundle.is_file() else "t2i"


def _read_store_file(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreIntegrityError(f"{path} is not valid JSON ({error}); restore it from a backup.") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        found = info.get("format") if isinstance(info, dict) else None
        raise StoreIntegrityError(f"{path.parent} has store format {found}; this obliviate reads format {FORMAT_VERSION}. "
                                  "Export the model with the obliviate that made the store and init a new store from it.")
    if info.get("kind") not in MODEL_FAMILIES:
        raise StoreIntegrityError(f"{path} names model kind {info.get('kind')!r}; expected one of {', '.join(MODEL_FAMILIES)}. "
                                  "Restore it from a backup.")
    return info


def _new_folder(path: str | Path, what: str) -> Path:
    """``path`` as an absolute, normalised folder that does not exist yet or is empty."""
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; choose a new folder for the {what}.")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty; choose a new folder for the {what}.")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"{blocking} is a file, so {path} cannot be created under it; choose another folder.")
    return path


def _build_whole(folder: Path, build: Callable[[Path], None]) -> None:
    """``build(staging)`` fills a staging folder beside ``folder``, which is then renamed into
    place: the folder appears whole or not at all, and a killed run leaves only the staging
    folder, which the next try replaces."""
    staging = folder.with_name(folder.name + ".partial" + TMP_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        build(staging)
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _methods_accepting_regularizers():
    from ..methods import METHODS
    return [(n, c) for n, c in METHODS["t2i"].items() if c.accepts_regularizers]


def _namespace(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of one component (``prefix/key``), keyed by ``key``."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + "/")}


@dataclass(frozen=True)
class ApplyOutcome:
    request_id: int
    model_hash: str
    metrics: dict
    cost: dict


@dataclass(frozen=True)
class _Run:
    """One request run on the model, before anything is written."""
    model: T2IModel | ClassifierModel  # holds the weights before the edit
    weights_before: StoredTensors
    previous_state: dict[str, torch.Tensor]  # every component's state before the request
    context: UnlearningContext
    result: MethodResult
    seconds: float
    memory: PeakMemory


class Store:
    """A store on disk. ``key`` signs the ledger rows this process appends and checks every row's
    signature in ``verify``; by default it comes from ``OBLIVIATE_LEDGER_KEY`` or
    ``OBLIVIATE_LEDGER_KEY_FILE`` (see ``ledger``), and it is never written into the store."""

    def __init__(self, root: str | Path, key: bytes | None = None):
        self.root = Path(root)
        if not (self.root / STORE_FILE).is_file():
            raise FileNotFoundError(f"{self.root} is not an obliviate store (no {STORE_FILE}); "
                                    f"create one with `obliviate init {self.root} --model shapes-t2i`.")
        self.info = _read_store_file(self.root / STORE_FILE)
        self.family = MODEL_FAMILIES[self.info["kind"]]
        self.key = key if key is not None else ledger_key()
        self.ledger = Ledger(self.root / LEDGER_FILE, self.key)
        self._hashes: dict[tuple, str] = self._read_hash_cache()  # (how, path, inode, size, mtime, ctime) -> digest
        self._unsaved = False  # digests remembered since hashes.cache was read or written

    @staticmethod
    def exists(root: str | Path) -> bool:
        """Whether ``root`` holds a store (``Store(root)`` then opens it)."""
        return (Path(root) / STORE_FILE).is_file()

    # ------------------------------------------------------------------ creation
    @classmethod
    def init(cls, root: str | Path, model: str | Path = DEFAULT_T2I, retain: tuple[str, ...] = (),
             evaluation: dict | None = None, key: bytes | None = None,
             check: Callable[["Store"], object] | None = None) -> "Store":
        """Create a store holding ``model`` (a zoo name or a model folder) and an empty ledger.
        ``evaluation`` (EvalConfig fields) configures the evaluator `apply` runs after each
        request; ``check(store)`` may refuse the new store (raise) before it appears, e.g. when
        its evaluation options do not suit its model. The store is built beside ``root`` and
        renamed into place, so it appears whole or not at all."""
        from ..models.zoo import resolve_model_path

        root = _new_folder(root, "store")
        key = key if key is not None else ledger_key()
        source = resolve_model_path(model)

        def build(staging: Path) -> None:
            kind = model_family(source)
            family = MODEL_FAMILIES[kind]
            family.load(source).save(staging / "base")
            base_hash = tensor_hash(family.stored_tensors(staging / "base"))  # no second copy in memory
            info = {"format": FORMAT_VERSION, "kind": kind, "model_source": str(model), "retain": list(retain),
                    "evaluation": evaluation}
            (staging / STORE_FILE).write_text(json.dumps(info, indent=2))
            ledger = Ledger(staging / LEDGER_FILE, key, create=True)
            ledger.append("init", {"model_source": str(model), "base_hash": base_hash, "weights_file": None,
                                   "store_file_hash": file_hash(staging / STORE_FILE),
                                   "base_files": folder_hashes(staging / "base")}, model_hash=base_hash)
            ledger.close()
            if check is not None:
                check(cls(staging, key))

        _build_whole(root, build)
        return cls(root, key)

    # ------------------------------------------------------------------ reading
    def state(self) -> LedgerState:
        try:
            return derive_state(self.ledger.events())
        except (KeyError, TypeError, ValueError) as error:
            raise StoreIntegrityError(f"The ledger's rows do not describe a store obliviate wrote ({type(error).__name__}: "
                                      f"{error}); run `obliviate verify {self.root}` and restore from a backup.") from None

    @contextlib.contextmanager
    def locked(self, wait: float = 0.0):
        with exclusive_lock(self.root / "lock", wait):
            self._remove_leftovers()
            yield

    def _base_model(self):
        return self.family.load(self.root / "base")

    def base_model(self):
        """The model the store started from, before any request."""
        return self._base_model().eval()

    def _base_tensors(self) -> StoredTensors:
        return self.family.stored_tensors(self.root / "base")

    def _weights_at(self, state: LedgerState) -> StoredTensors:
        """The model's tensors at ``state``, each read from disk when used."""
        weights_file = state.model_event.payload.get("weights_file")
        return self._base_tensors() if weights_file is None else StoredTensors([("", self.root / weights_file)])

    def load_model(self, check: bool = True):
        """The current model. With ``check``, refuse if the weights on disk are not the ones the
        ledger recorded."""
        if check:
            self.raise_if_corrupt(replay=False)
        state = self.state()
        model = self._base_model()
        model.load_state_tensors(self._weights_at(state))
        return model.eval()

    def replay(self, upto: int | None = None) -> Mapping[str, torch.Tensor]:
        """Weights after applied request ``upto`` (the latest when None; 0 = base), rebuilt from
        base and edits. Bit-identical to what was recorded, by construction. Lazy: each tensor
        is read from the base and put through the edits when used."""
        state = self.state()
        stack = state.applied if upto is None else state.applied[:state.applied.index(upto) + 1] if upto else ()
        weights: Mapping[str, torch.Tensor] = self._base_tensors()
        for rid in stack:
            weights = Edit.from_tensors(load_tensors(self.root / state.apply_events[rid].payload["edit_file"])).view(weights)
        return weights

    # ------------------------------------------------------------------ requests
    def add_request(self, targets: tuple[str, ...] | list[str], method: str, method_config: dict | None = None,
                    anchor: str | None = None, regularizers: tuple[RegularizerSpec, ...] = (), seed: int = 0,
                    wait: float = 0.0, limits: bool = True) -> int:
        """Validate and record a pending request; returns its id. Nothing is written if invalid.
        ``limits=False`` accepts step counts and other sizes above the config limits."""
        targets = tuple(t.strip() for t in targets)
        method_cls = get_method(method, self.info["kind"])
        if regularizers and not method_cls.accepts_regularizers:
            raise ValueError(f"Method {method!r} does not run regularizers (they plug into the diffusion gradient methods: "
                             f"{', '.join(n for n, c in _methods_accepting_regularizers())}); drop --regularizer.")
        config = build_config(method_cls.config_class, method_config, owner=f"method {method!r}", limits=limits)
        method_cls(config).check_parameters(self.family.parameter_names(self.root / "base"))
        checked_regs = tuple(self._check_regularizer(r, limits) for r in regularizers)
        check_composition([r.name for r in checked_regs])
        request = Request(targets, method, config_to_dict(config), anchor, checked_regs, seed)
        self.prompts().validate(targets, anchor)
        with self.locked(wait):
            next_id = max(self.state().requests, default=0) + 1
            self.ledger.append("add", {"request": request.to_json()}, request_id=next_id)
        return next_id

    def _check_regularizer(self, spec: RegularizerSpec, limits: bool) -> RegularizerSpec:
        reg_cls = get_regularizer(spec.name)
        return RegularizerSpec(spec.name, config_to_dict(build_config(reg_cls.config_class, spec.config,
                                                                      owner=f"regularizer {spec.name!r}", limits=limits)))

    @property
    def language(self) -> str | None:
        """The embedded world's language the store's model was trained in; None for other models."""
        return bundle_language(self.root / "base") if self.info["kind"] == "t2i" else None

    def prompts(self):
        """What request targets may name and where methods, the evaluator and attacks get their
        inputs: prompts for a text-to-image model, the training data for a classifier."""
        return self.family.request_vocabulary(self.root / "base", tuple(self.info.get("retain", ())))

    # ------------------------------------------------------------------ apply
    def apply(self, evaluator: Callable | None = None, wait: float = 0.0, on_start: Callable | None = None,
              progress: Callable | None = None, limit: int | None = None) -> list[ApplyOutcome]:
        """Apply pending requests in order; each is all-or-nothing. ``evaluator(model, store)``
        returns metrics recorded with the request.

        Under a data-parallel launch (``accelerate launch --num_processes N obliviate apply``)
        every process trains each request on its share of the batches; only the main process
        holds the lock, writes, evaluates and returns outcomes."""
        processes = Processes.current()
        if not processes.is_main:
            for rid in processes.share(None):
                self._run(rid, self.state(), None)
                processes.barrier()  # the next request starts from what the main process committed
            return []
        outcomes = []
        with self.locked(wait):
            self.raise_if_corrupt(replay=False)
            for rid in processes.share(self.state().pending[:limit]):
                if on_start:
                    on_start(rid, self.state().requests[rid])
                outcomes.append(self._apply_one(rid, evaluator, progress))
                processes.barrier()
        return outcomes

    def _run(self, rid: int, state: LedgerState, progress) -> "_Run":
        """Request ``rid`` run on the model of ``state``; nothing is written."""
        request = state.requests[rid]
        model = self._base_model()
        # the weights are read from disk when used, so the model is the only copy held
        base_weights, weights_before = self._base_tensors(), self._weights_at(state)
        if state.model_event.payload.get("weights_file") is not None:
            model.load_state_tensors(weights_before)
        method = get_method(request.method, self.info["kind"]).from_options(request.method_config, limits=False)
        previous_state = self._method_state(state)
        device = Processes.current().device
        context = UnlearningContext(
            prompts=self.prompts(),
            base_weights=base_weights,
            state=_namespace(previous_state, request.method),
            regularizer_states={r.name: _namespace(previous_state, f"reg.{r.name}") for r in request.regularizers},
            forgotten=state.forgotten,
            device=device, progress=progress)
        start = time.time()
        with PeakMemory(device) as memory:
            result = method.unlearn(model.to(device), request, context)
        return _Run(model, weights_before, previous_state, context, result, time.time() - start, memory)

    def _apply_one(self, rid: int, evaluator, progress) -> ApplyOutcome:
        state = self.state()
        request = state.requests[rid]
        run = self._run(rid, state, progress)
        model, result = run.model, run.result
        weights_after = result.edit.view(run.weights_before)  # streamed into the hash and the file
        model_hash = tensor_hash(weights_after)

        # each component's state is replaced as a whole by what it returned
        updates = {request.method: result.state, **{f"reg.{n}": v for n, v in result.regularizer_states.items()}}
        new_state = {k: v for k, v in run.previous_state.items() if k.split("/", 1)[0] not in updates}
        for namespace, values in updates.items():
            new_state.update({f"{namespace}/{k}": v for k, v in values.items()})
        files = {"edit_file": f"edits/{rid:05d}.safetensors", "state_file": f"state/{rid:05d}.safetensors",
                 "weights_file": f"weights/after-{rid:05d}.safetensors"}
        atomic_save_tensors(result.edit.to_tensors(), self.root / files["edit_file"])
        atomic_save_tensors(new_state, self.root / files["state_file"])
        atomic_save_tensors(weights_after, self.root / files["weights_file"])

        metrics = {}
        if evaluator is not None:
            model.load_state_tensors(weights_after)
            metrics = evaluator(model, self, forgotten=run.context.forgotten + request.targets)
        cost = {"seconds": round(run.seconds, 3), "peak_memory_bytes": run.memory.peak_bytes, "peak_memory_kind": run.memory.kind,
                "edit_bytes": result.edit.nbytes,
                "stored_bytes": sum((self.root / files[k]).stat().st_size for k in ("edit_file", "state_file")),
                **result.stats}
        payload = {**files, "edit_hash": file_hash(self.root / files["edit_file"]),
                   "state_hash": file_hash(self.root / files["state_file"]),
                   "position": len(state.applied) + 1, "cost": cost, "metrics": metrics}
        self.ledger.append("apply", payload, request_id=rid, model_hash=model_hash)  # the commit point
        self._remove_leftovers()
        return ApplyOutcome(rid, model_hash, metrics, cost)

    def outcome(self, rid: int) -> ApplyOutcome:
        """What ``apply`` returned for applied request ``rid``, read back from its ledger row."""
        event = self.state().apply_events[rid]
        return ApplyOutcome(rid, event.model_hash, event.payload["metrics"], event.payload["cost"])

    def _method_state(self, state: LedgerState) -> dict[str, torch.Tensor]:
        if not state.applied:
            return {}
        return load_tensors(self.root / state.apply_events[state.applied[-1]].payload["state_file"])

    def method_state(self) -> dict[str, torch.Tensor]:
        """The state every method has left after the requests now in the model."""
        return self._method_state(self.state())

    # ------------------------------------------------------------------ rollback
    def rollback(self, to: int, wait: float = 0.0) -> str:
        """Return to the model as it was right after applied request ``to`` (0 = base);
        bit-identical to what the ledger recorded then. Returns the model hash."""
        with self.locked(wait):
            self.raise_if_corrupt(replay=False)
            state = self.state()
            if to != 0 and to not in state.applied:
                raise ValueError(f"Request {to} is not in the model; applied requests are "
                                 f"{', '.join(map(str, state.applied)) or 'none'} (0 = the base model).")
            if state.applied and to == state.applied[-1] or (to == 0 and not state.applied):
                raise ValueError(f"The model is already at request {to}; nothing to roll back.")
            weights = self.replay(to)
            expected = state.apply_events[to].model_hash if to else self._base_hash()
            digest = tensor_hash(weights)
            if digest != expected:
                raise StoreIntegrityError(f"Replaying the edits up to request {to} gives weights with hash {digest[:12]}, "
                                          f"but the ledger recorded {expected[:12]}; run `obliviate verify`.")
            weights_file = None
            if to:
                weights_file = f"weights/after-{to:05d}.safetensors"
                atomic_save_tensors(weights, self.root / weights_file)
            undone = list(state.applied[state.applied.index(to) + 1:] if to else state.applied)
            self.ledger.append("rollback", {"to": to, "undone": undone, "weights_file": weights_file}, model_hash=digest)
            self._remove_leftovers()
            return digest

    def _base_hash(self) -> str:
        return self.ledger.events()[0].payload["base_hash"]

    # ------------------------------------------------------------------ integrity
    def verify(self, replay: bool = True, expect: Head | None = None, cached: bool = True) -> list[str]:
        """Every mismatch between files, weights and ledger, as messages (empty when sound).
        ``expect`` is a head recorded earlier (``status`` prints it): it must still be in the chain.
        With a key, every ledger row must carry its signature. ``cached=False`` re-hashes files
        whose digests are remembered (see ``_hash``) too."""
        if not cached:
            self._hashes.clear()
        problems = self._verify(replay, expect)
        self._save_hash_cache()
        return problems

    def _verify(self, replay: bool, expect: Head | None) -> list[str]:
        problems = self.ledger.check_chain()
        if self.key:
            problems += self.ledger.check_signatures()
        problems += self.ledger.check_recorded_head()
        if expect is not None:
            problems += self.ledger.check_head(expect, "the expected head")
        events = self.ledger.events()
        if not events or events[0].kind != "init":
            return problems + ["ledger has no init row"]
        try:
            problems += self._check_contents(events, replay and not problems)
        except (KeyError, TypeError, ValueError) as error:  # rows that are JSON but not our events
            problems.append(f"ledger rows do not describe a store obliviate wrote ({type(error).__name__}: {error})")
        return problems

    def _check_contents(self, events, replay: bool) -> list[str]:
        """The store's files and weights against what the ledger's events recorded."""
        init = events[0].payload
        problems = self._check_recorded_files(init)
        state = derive_state(events)
        for rid in state.applied:
            event = state.apply_events[rid]
            for key in ("edit", "state"):
                path = self.root / event.payload[f"{key}_file"]
                if not path.is_file():
                    problems.append(f"{path} is missing (request {rid}, ledger row {event.seq})")
                elif self._hash(path) != event.payload[f"{key}_hash"]:
                    problems.append(f"{path} was modified after request {rid} was applied (ledger row {event.seq})")
        current = state.model_event
        weights_file = current.payload.get("weights_file")
        if weights_file:
            path = self.root / weights_file
            if not path.is_file():
                problems.append(f"{path} (current weights) is missing")
            elif self._weights_hash(path) != current.model_hash:
                problems.append(f"{path} (current weights) does not match the hash in ledger row {current.seq}")
        elif current.model_hash != init["base_hash"]:
            problems.append(f"ledger row {current.seq} expects weights {current.model_hash[:12]} but the base model is current")
        if replay and not problems:
            if tensor_hash(self._base_tensors()) != init["base_hash"]:
                problems.append(f"base model weights in {self.root / 'base'} do not match the hash recorded at init")
            elif tensor_hash(self.replay()) != current.model_hash:
                problems.append("replaying base + edits does not reproduce the current weights recorded in the ledger")
        return problems

    def _weights_hash(self, path: Path) -> str | None:
        """``tensor_hash`` of a weights file; None when it is no longer a safetensors file."""
        try:
            return self._hash(path, tensors=True)
        except ValueError:
            return None

    def _hash(self, path: Path, tensors: bool = False) -> str:
        """``file_hash`` of ``path`` (``tensor_hash`` of its tensors with ``tensors``), computed
        once while the file's inode, size and times stay the same, and remembered across
        processes in ``hashes.cache``: every load verifies the store, and re-reading gigabytes of
        unchanged weights each time is waste. The kernel sets ctime on any change (no call sets
        it back), so a file written since is hashed again; a file changed in the last seconds is
        never remembered, as a coarse clock could give a second change the same times (git's
        "racy clean" rule). ``verify(cached=False)`` ignores what is remembered."""
        info = path.stat()
        key = (tensors, str(path.relative_to(self.root)), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if key in self._hashes:
            return self._hashes[key]
        digest = tensor_hash(StoredTensors([("", path)])) if tensors else file_hash(path)
        if time.time_ns() - info.st_ctime_ns > 2_000_000_000:
            self._hashes[key] = digest
            self._unsaved = True
        return digest

    def _read_hash_cache(self) -> dict[tuple, str]:
        """The remembered digests; none when the file is absent, unreadable or, in a store with a
        key, not signed by it (anyone who can write the store could write a cache: with a key,
        only the key's holder can)."""
        try:
            saved = json.loads((self.root / HASH_CACHE).read_text())
            entries, mac = saved["entries"], saved.get("mac")
            if self.key and not (isinstance(mac, str) and hmac.compare_digest(mac, self._cache_mac(entries))):
                return {}
            return {tuple(json.loads(key)): digest for key, digest in entries.items() if isinstance(digest, str)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def _cache_mac(self, entries: dict) -> str:
        return hmac.new(self.key, json.dumps(entries, sort_keys=True).encode(), hashlib.sha256).hexdigest()

    def _save_hash_cache(self) -> None:
        """Write the digests of files that still have the remembered inode, size and times."""
        if not self._unsaved:
            return
        entries = {}
        for key, digest in self._hashes.items():
            try:
                info = (self.root / key[1]).stat()
            except OSError:
                continue
            if key[2:] == (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns):
                entries[json.dumps(list(key))] = digest
        saved = {"entries": entries, **({"mac": self._cache_mac(entries)} if self.key else {})}
        try:
            atomic_write_text(json.dumps(saved), self.root / HASH_CACHE)
            self._unsaved = False
        except OSError:  # a read-only store verifies all the same, just without remembering
            pass

    def _check_recorded_files(self, init: dict) -> list[str]:
        """store.json and every file of the base model against the hashes the init row recorded."""
        problems = []
        if self._hash(self.root / STORE_FILE) != init["store_file_hash"]:
            problems.append(f"{self.root / STORE_FILE} was modified after init")
        recorded, present = init["base_files"], folder_hashes(self.root / "base", self._hash)
        for name in sorted(recorded.keys() | present.keys()):
            path = self.root / "base" / name
            if name not in present:
                problems.append(f"{path} is missing (a file of the base model)")
            elif name not in recorded:
                problems.append(f"{path} was added after init (not a file of the base model)")
            elif present[name] != recorded[name]:
                problems.append(f"{path} was modified after init (a file of the base model)")
        return problems

    def raise_if_corrupt(self, replay: bool = False) -> None:
        problems = self.verify(replay=replay)
        if problems:
            raise StoreIntegrityError(f"Store {self.root} failed verification:\n  - " + "\n  - ".join(problems)
                                      + "\nRestore the named files from a backup; obliviate will not work on a tampered store.")

    def _remove_leftovers(self) -> None:
        """Delete files no ledger row refers to: what an interrupted write left behind."""
        state = self.state()
        keep = {e.payload[k] for e in self.ledger.events() if e.kind == "apply" for k in ("edit_file", "state_file")}
        if state.model_event.payload.get("weights_file"):
            keep.add(state.model_event.payload["weights_file"])
        for folder in ("edits", "state", "weights"):
            for path in (self.root / folder).glob("*") if (self.root / folder).is_dir() else ():
                if f"{folder}/{path.name}" not in keep:
                    path.unlink()

    # ------------------------------------------------------------------ evaluation
    def forgotten(self) -> tuple[str, ...]:
        return self.state().forgotten

    def evaluate(self, evaluator: Callable, record: bool = True, wait: float = 0.0) -> dict:
        """Evaluate the current model; with ``record``, append the result to the ledger."""
        model = self.load_model(check=True)
        metrics = evaluator(model, self, forgotten=self.forgotten())
        if record:
            with self.locked(wait):
                state = self.state()
                self.ledger.append("evaluate", {"after": state.applied[-1] if state.applied else 0, "metrics": metrics},
                                   model_hash=state.model_event.model_hash)
        return metrics

    def attack(self, attack, concept: str, judge, record: bool = True, seed: int = 0, wait: float = 0.0,
               oracles_dir: str | Path | None = None):
        """Run an attack on the current model for ``concept``; with ``record``, log the result.
        When a retrain oracle never saw the concept (one for everything forgotten here, else one
        for the concept alone; see ``find_oracle``), the same attack runs on it too, as the bar:
        a relearn curve no steeper than the oracle's means the concept is as gone as retraining
        makes it."""
        from ..models.zoo import find_oracle
        if self.info["kind"] != "t2i":
            raise ValueError("Attacks target text-to-image stores. For a classifier, `obliviate eval STORE` already "
                             "measures relearning (relearn_steps) and what the features still hold (probe), next to the oracle.")
        prompts = self.prompts()
        prompts.validate((concept,), None)
        result = attack.run(self.load_model(check=True), concept, judge, prompts, seed=seed)
        oracle = find_oracle(self.forgotten(), self.language, oracles_dir) or find_oracle((concept,), self.language, oracles_dir)
        if oracle is not None:
            reference = attack.run(self.family.load(oracle).eval(), concept, judge, prompts, seed=seed)
            result = replace(result, oracle=replace(reference, details={
                **reference.details, "model": oracle.parent.name}))
        if record:
            with self.locked(wait):
                state = self.state()
                self.ledger.append("attack", {"after": state.applied[-1] if state.applied else 0, "result": result.to_dict(),
                                              "config": config_to_dict(attack.config)}, model_hash=state.model_event.model_hash)
        return result

    # ------------------------------------------------------------------ export and status
    def export(self, out: str | Path) -> Path:
        """Write the current model as a folder that diffusers (unet/, scheduler/) and
        ``T2IModel.load`` read. Text-space edits are folded into the UNet's cross-attention, so a
        reader that knows nothing of obliviate draws the same images."""
        out = _new_folder(out, "export")
        _build_whole(out, self.load_model(check=True).export)
        return out

    def export_lora(self, out: str | Path, rank: int | None = None) -> dict:
        """Write the current model's change to the base UNet as a LoRA file
        (``OUT/pytorch_lora_weights.safetensors``, keys as diffusers' ``load_lora_weights`` reads
        them) and return the reconstruction error. Each changed linear weight's delta (text-space
        edits folded in first) becomes B A from its SVD, truncated to ``rank`` (None: exact).
        Changes a LoRA cannot hold (convolutions, norms, biases) are refused, not dropped."""
        from safetensors.torch import save_file
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}.")
        if self.info["kind"] != "t2i":
            raise ValueError("LoRA export is for text-to-image stores; export a classifier with --format diffusers.")
        model = self.load_model(check=True)
        model.fold_text_transforms()
        base, current = self.base_model().unet.state_dict(), model.unet.state_dict()
        changed = [k for k in current if not torch.equal(current[k], base[k])]
        dense = [k for k in changed if not (k.endswith(".weight") and current[k].ndim == 2)]
        if dense:
            raise ValueError(f"The edit changes {len(dense)} tensors a LoRA cannot hold (e.g. {', '.join(dense[:3])}); "
                             "export it with --format diffusers, or apply requests that train only linear weights "
                             "(e.g. --set trainable=xattn-kv).")
        tensors, errors = {}, {}
        for key in changed:
            delta = (current[key] - base[key]).double()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = int((s > s[0] * 1e-7).sum()) if rank is None else min(rank, len(s))
            module = f"unet.{key[:-len('.weight')]}"
            tensors[f"{module}.lora_B.weight"] = (u[:, :r] * s[:r].sqrt()).float().contiguous()
            tensors[f"{module}.lora_A.weight"] = (s[:r].sqrt()[:, None] * vh[:r]).float().contiguous()
            errors[key] = float(s[r:].norm() / s.norm()) if s.norm() > 0 else 0.0
        if not tensors:
            raise ValueError("The current model is the base model; there is no change to export.")
        out = _new_folder(out, "LoRA export")
        _build_whole(out, lambda staging: save_file(tensors, staging / "pytorch_lora_weights.safetensors"))
        return {"path": str(out / "pytorch_lora_weights.safetensors"), "tensors": len(errors),
                "max_relative_error": max(errors.values()), "bytes": sum(t.numel() * 4 for t in tensors.values())}

    def status(self) -> dict:
        state = self.state()
        current = state.model_event
        return {
            "store": str(self.root), "model_source": self.info["model_source"], "kind": self.info["kind"],
            "ledger_head": str(self.ledger.head()), "signed": self.ledger.signed, "model_hash": current.model_hash, "applied": list(state.applied), "pending": list(state.pending),
            "requests": [{"id": rid, "targets": list(r.targets), "label": r.label, "method": r.method, "anchor": r.anchor,
                          "regularizers": [x.name for x in r.regularizers], "status": state.status[rid],
                          "model_hash": state.apply_events[rid].model_hash if rid in state.apply_events else None,
                          "cost": state.apply_events[rid].payload["cost"] if rid in state.apply_events else None,
                          "metrics": state.metrics.get(rid)}
                         for rid, r in sorted(state.requests.items())],
            "base_metrics": state.metrics.get(0),
        }
