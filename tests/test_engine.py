import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from obliviate.engine import RegularizerSpec, Store, StoreIntegrityError, StoreLocked
from obliviate.engine.files import load_tensors
from obliviate.hashing import tensor_hash
from obliviate.tensors import StoredTensors
from obliviate.engine.lock import exclusive_lock
from safetensors.torch import save_file

FAST = {"steps": "2", "forget_images": "2", "sampling_steps": "2", "batch_size": "2"}


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    return Store.init(tmp_path / "store", tiny_model_dir)


def snapshot(root: Path) -> dict:
    """Every file's bytes (except SQLite's WAL side files and the lock) plus the ledger events."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
             if p.is_file() and not p.name.startswith("ledger.sqlite") and p.name not in ("lock", "hashes.cache")}
    events = [(e.seq, e.kind, e.request_id, e.hash) for e in Store(root).ledger.events()]
    return {"files": files, "events": events}


def test_rollback_is_bit_exact_after_several_requests(store):
    for target in ("striped", "triangle", "red"):
        store.add_request([target], "esd", FAST)
    weights = {}
    for rid in (1, 2, 3):
        store.apply(limit=1)
        weights[rid] = load_tensors(store.root / store.state().model_event.payload["weights_file"])
    assert len({tensor_hash(w) for w in weights.values()}) == 3  # every request changed the model
    base = store.replay(0)

    store.rollback(1)
    current = store.load_model().state_tensors()
    assert all(torch.equal(current[k], weights[1][k]) for k in weights[1])
    assert store.status()["applied"] == [1]
    assert [r["status"] for r in store.status()["requests"]] == ["applied", "rolled_back", "rolled_back"]
    assert store.verify() == []

    store.rollback(0)
    current = store.load_model().state_tensors()
    assert all(torch.equal(current[k], base[k]) for k in base)
    assert store.verify() == []
    with pytest.raises(ValueError, match="not in the model"):
        store.rollback(2)


def test_apply_after_rollback_continues_the_history(store):
    store.add_request(["striped"], "esd", FAST)
    store.add_request(["dotted"], "esd", FAST)
    store.apply()
    store.rollback(1)
    store.add_request(["circle"], "ablation", FAST)
    store.apply()
    assert store.status()["applied"] == [1, 3]
    assert store.verify() == []
    assert len(store.ledger.check_chain()) == 0


def test_seeded_apply_is_reproducible(tmp_path, tiny_model_dir):
    hashes = []
    for name in ("a", "b"):
        s = Store.init(tmp_path / name, tiny_model_dir)
        s.add_request(["striped"], "esd", FAST, seed=3)
        hashes.append(s.apply()[0].model_hash)
    assert hashes[0] == hashes[1]


def test_tampered_edit_file_is_detected_and_blocks_work(store, tmp_path):
    store.add_request(["striped"], "esd", FAST)
    store.add_request(["dotted"], "esd", FAST)
    store.apply()
    edit = store.root / "edits" / "00001.safetensors"
    data = bytearray(edit.read_bytes())
    data[-3] ^= 0xFF
    edit.write_bytes(bytes(data))
    problems = store.verify()
    assert any("edits/00001.safetensors" in p and "modified" in p for p in problems)
    with pytest.raises(StoreIntegrityError, match="00001"):
        store.load_model()
    with pytest.raises(StoreIntegrityError, match="00001"):
        store.export(tmp_path / "export")
    store.add_request(["red"], "esd", FAST)
    with pytest.raises(StoreIntegrityError, match="00001"):
        store.apply()


def test_tampered_current_weights_are_detected(store):
    store.add_request(["striped"], "esd", FAST)
    store.apply()
    path = store.root / store.state().model_event.payload["weights_file"]
    tensors = load_tensors(path)
    name = next(k for k in tensors if k.endswith("to_k.weight"))
    tensors[name][0, 0] += 1e-3
    from safetensors.torch import save_file
    save_file(tensors, path)
    assert any("current weights" in p for p in store.verify())


def test_edited_ledger_row_is_detected(store):
    store.add_request(["striped"], "esd", FAST)
    store.apply()
    db = sqlite3.connect(store.root / "ledger.sqlite")
    payload = json.loads(db.execute("SELECT payload FROM events WHERE seq = 2").fetchone()[0])
    payload["request"] = payload["request"].replace("striped", "dotted")
    db.execute("UPDATE events SET payload = ? WHERE seq = 2", (json.dumps(payload),))
    db.commit()
    db.close()
    problems = Store(store.root).verify()
    assert any(p.startswith("ledger row 2") and "edited" in p for p in problems)


def test_deleted_ledger_row_is_detected(store):
    store.add_request(["striped"], "esd", FAST)
    store.add_request(["dotted"], "esd", FAST)
    db = sqlite3.connect(store.root / "ledger.sqlite")
    db.execute("DELETE FROM events WHERE seq = 2")
    db.commit()
    db.close()
    assert any("ledger row 3" in p for p in Store(store.root).verify())


def test_bad_input_raises_clearly_and_leaves_the_store_untouched(store):
    store.add_request(["striped"], "esd", FAST)
    before = snapshot(store.root)
    bad = [
        (dict(targets=["stripped"], method="esd"), "Did you mean: striped"),
        (dict(targets=["striped"], method="esdx"), "Did you mean 'esd'"),
        (dict(targets=["striped"], method="esd", method_config={"stepz": "3"}), "Valid options"),
        (dict(targets=["striped"], method="esd", method_config={"steps": "-1"}), "positive"),
        (dict(targets=["striped"], method="esd", method_config={"variant": "y"}), "Unknown ESD variant"),
        (dict(targets=["triangle"], method="ablation", anchor="red"), "targets' domain"),
        (dict(targets=["triangle"], method="ablation", anchor="triangle"), "itself a target"),
        (dict(targets=["striped"], method="esd", regularizers=(RegularizerSpec("l3sp"),)), "Did you mean 'l2sp'"),
        (dict(targets=["striped"], method="esd", regularizers=(RegularizerSpec("l2sp", {"weight": "-1"}),)), ">= 0"),
        (dict(targets=[" "], method="esd"), "non-empty"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            store.add_request(**kwargs)
    with pytest.raises(ValueError, match="not in the model"):
        store.rollback(5)
    with pytest.raises(ValueError, match="already at request 0"):
        store.rollback(0)
    assert snapshot(store.root) == before


def test_init_refuses_non_empty_folder_and_unknown_model(tmp_path, tiny_model_dir):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        Store.init(tmp_path / "full", tiny_model_dir)
    with pytest.raises(ValueError, match="neither a zoo model"):
        Store.init(tmp_path / "new", tmp_path / "missing")
    assert not (tmp_path / "new").exists()
    with pytest.raises(FileNotFoundError, match="not an obliviate store"):
        Store(tmp_path / "full")


def test_second_writer_fails_clearly_or_waits(store):
    store.add_request(["striped"], "esd", FAST)
    with exclusive_lock(store.root / "lock"):
        with pytest.raises(StoreLocked, match="busy: locked by pid"):
            Store(store.root).apply(wait=0.2)
        with pytest.raises(StoreLocked):
            Store(store.root).add_request(["dotted"], "esd", FAST)
    assert store.status()["pending"] == [1]

    holder_done = threading.Event()

    def hold_briefly():
        with exclusive_lock(store.root / "lock"):
            time.sleep(0.5)
        holder_done.set()

    thread = threading.Thread(target=hold_briefly)
    thread.start()
    time.sleep(0.1)
    outcomes = Store(store.root).apply(wait=30)
    thread.join()
    assert holder_done.is_set() and [o.request_id for o in outcomes] == [1]


# --------------------------------------------------------------------------- fault injection
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from obliviate.engine import store as store_module
    from obliviate.engine import files as files_module
    from obliviate.engine.ledger import Ledger
    from obliviate.methods import esd

    point, operation = sys.argv[2], sys.argv[3]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "during_training":
        original = esd.ESD.loss
        def loss(self, session):
            if session.step == 1:
                die()
            return original(self, session)
        esd.ESD.loss = loss
    elif point.startswith("after_write_"):
        count = {"n": 0}
        original_save = files_module.atomic_save_tensors
        def save(*args, **kwargs):
            original_save(*args, **kwargs)
            count["n"] += 1
            if count["n"] == int(point.rsplit("_", 1)[1]):
                die()
        store_module.atomic_save_tensors = save
    elif point == "before_rename":
        original_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("00001.safetensors"):
                die()
            return original_replace(src, dst)
        os.replace = replace
    elif point in ("before_commit", "after_commit"):
        original_append = Ledger.append
        def append(self, kind, *args, **kwargs):
            if kind == operation and point == "before_commit":
                die()
            event = original_append(self, kind, *args, **kwargs)
            if kind == operation:
                die()
            return event
        Ledger.append = append
    elif point == "export_before_rename":
        original_rename = os.rename
        def rename(src, dst):
            if str(src).endswith(".partial.tmp"):
                die()
            return original_rename(src, dst)
        os.rename = rename

    store = store_module.Store(sys.argv[1])
    if operation == "apply":
        store.apply()
    elif operation == "rollback":
        store.rollback(1)
    else:
        store.export(sys.argv[4])
""")


def run_driver(tmp_path, *args) -> subprocess.CompletedProcess:
    """Run DRIVER in a fresh process (one thread) with ``args``: store, kill point, operation[, out]."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(driver), *map(str, args)], env=env, capture_output=True)


@pytest.mark.parametrize("point", ["during_training", "before_rename", "after_write_1", "after_write_2",
                                   "after_write_3", "before_commit"])
def test_kill_during_apply_leaves_store_as_before_and_redo_works(tmp_path, tiny_model_dir, point):
    reference = Store.init(tmp_path / "reference", tiny_model_dir)
    reference.add_request(["striped"], "esd", FAST)
    expected_hash = reference.apply()[0].model_hash

    store = Store.init(tmp_path / "store", tiny_model_dir)
    store.add_request(["striped"], "esd", FAST)
    before = snapshot(store.root)
    result = run_driver(tmp_path, str(store.root), point, "apply")
    assert result.returncode == -9, result.stderr.decode()[-2000:]

    reopened = Store(store.root)
    with reopened.locked():  # what any next write does first: drop what no ledger row refers to
        pass
    assert snapshot(store.root) == before
    assert reopened.verify() == []
    assert reopened.status()["pending"] == [1]
    assert reopened.apply()[0].model_hash == expected_hash  # the next apply redoes it, identically


def test_kill_right_after_commit_keeps_the_request(tmp_path, tiny_model_dir):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    store.add_request(["striped"], "esd", FAST)
    result = run_driver(tmp_path, str(store.root), "after_commit", "apply")
    assert result.returncode == -9
    reopened = Store(store.root)
    assert reopened.status()["applied"] == [1]
    assert reopened.verify() == []


@pytest.mark.parametrize("point", ["after_write_1", "before_commit", "after_commit"])
def test_kill_during_rollback_leaves_the_store_before_or_after_it(tmp_path, tiny_model_dir, point):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    store.add_request(["striped"], "esd", FAST)
    store.add_request(["dotted"], "esd", FAST)
    after_first = store.apply()[0].model_hash
    before = snapshot(store.root)
    result = run_driver(tmp_path, str(store.root), point, "rollback")
    assert result.returncode == -9, result.stderr.decode()[-2000:]

    reopened = Store(store.root)
    with reopened.locked():
        pass
    assert reopened.verify() == []
    if point == "after_commit":  # the ledger row landed: the rollback happened
        assert reopened.status()["applied"] == [1]
    else:
        assert snapshot(store.root) == before
        assert reopened.rollback(1) == after_first


def test_kill_during_export_leaves_no_half_written_model(tmp_path, tiny_model_dir):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    store.add_request(["striped"], "esd", FAST)
    store.apply()
    before = snapshot(store.root)
    out = tmp_path / "exported"
    result = run_driver(tmp_path, str(store.root), "export_before_rename", "export", str(out))
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert not out.exists() and snapshot(store.root) == before
    store.export(out)  # a second try replaces what the killed one left beside it
    assert (out / "unet" / "config.json").is_file() and not list(tmp_path.glob("*.partial.tmp"))


def test_verify_hashes_an_unchanged_file_once_per_process_and_a_changed_one_again(store, monkeypatch):
    from obliviate.engine import store as store_module
    store.add_request(["striped"], "esd", FAST)
    store.apply()
    later = time.time_ns() + 10**10  # as if every file were older than the racy window
    monkeypatch.setattr(store_module.time, "time_ns", lambda: later)
    hashed = []
    original = store_module.file_hash
    monkeypatch.setattr(store_module, "file_hash", lambda path: hashed.append(Path(path).name) or original(path))
    assert store.verify(replay=False) == [] and "00001.safetensors" in hashed
    hashed.clear()
    assert store.verify(replay=False) == [] and hashed == []
    assert Store(store.root).verify(replay=False) == [] and hashed == []  # another process: remembered on disk
    assert Store(store.root).verify(replay=False, cached=False) == [] and "00001.safetensors" in hashed
    hashed.clear()
    edit = store.root / "edits" / "00001.safetensors"
    data = bytearray(edit.read_bytes())
    data[-3] ^= 0xFF
    time.sleep(0.01)
    edit.write_bytes(bytes(data))
    assert any("00001" in p for p in store.verify(replay=False)) and hashed == ["00001.safetensors"]


def test_loading_a_store_reads_no_unchanged_file_to_hash_it(store, monkeypatch):
    """SD-sized stores: verifying on every load must not re-read gigabytes of unchanged weights."""
    from obliviate.engine import store as store_module
    store.add_request(["striped"], "uce", {"erase_prompts": "4", "preserve_prompts": "8"})
    store.apply()
    later = time.time_ns() + 10**10  # as if every file were older than the racy window
    monkeypatch.setattr(store_module.time, "time_ns", lambda: later)
    read = []
    file_hash, tensor_hash = store_module.file_hash, store_module.tensor_hash
    monkeypatch.setattr(store_module, "file_hash", lambda path: read.append(Path(path).stat().st_size) or file_hash(path))
    monkeypatch.setattr(store_module, "tensor_hash",
                        lambda tensors: read.append(sum(t.nbytes for t in tensors.values())) or tensor_hash(tensors))
    Store(store.root).load_model()
    assert sum(read) > sum(p.stat().st_size for p in (store.root / "base").rglob("*.safetensors"))
    read.clear()
    Store(store.root).load_model()  # a later process
    assert sum(read) == 0


def test_a_signed_store_ignores_a_hash_cache_written_without_its_key(tmp_path, tiny_model_dir, monkeypatch):
    from obliviate.engine import store as store_module
    key = b"k" * 32
    store = Store.init(tmp_path / "s", tiny_model_dir, key=key)
    store.add_request(["striped"], "uce", {"erase_prompts": "4", "preserve_prompts": "8"})
    store.apply()
    later = time.time_ns() + 10**10
    monkeypatch.setattr(store_module.time, "time_ns", lambda: later)
    assert Store(store.root, key=key).verify(replay=False) == []
    cache = json.loads((store.root / "hashes.cache").read_text())
    weights = next((store.root / "weights").glob("*.safetensors"))
    recorded = next(d for k, d in cache["entries"].items() if json.loads(k)[1] == f"weights/{weights.name}")
    tampered = load_tensors(weights)
    next(iter(tampered.values())).add_(1)
    save_file(tampered, weights)
    info = weights.stat()  # a forger records the old digest under the tampered file's new times
    cache["entries"][json.dumps([True, f"weights/{weights.name}", info.st_ino, info.st_size, info.st_mtime_ns,
                                 info.st_ctime_ns])] = recorded
    (store.root / "hashes.cache").write_text(json.dumps(cache))
    with pytest.raises(StoreIntegrityError, match="current weights"):
        Store(store.root, key=key).load_model()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 200), st.binary(max_size=4))
def test_a_damaged_safetensors_file_is_refused_or_read_whole(tmp_path_factory, garbage, cut, patch):
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("damaged")
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}, folder / "good")
    data = bytearray((folder / "good").read_bytes())
    data[cut % len(data):cut % len(data) + len(patch)] = patch
    (folder / "bad").write_bytes(bytes(data[:len(data) - cut % 5]) + garbage)
    try:
        stored = StoredTensors([("", folder / "bad")])
    except ValueError:
        return
    for name in stored:  # a header we accept describes bytes that are all there
        assert stored[name].dtype == stored.spec(name)[0] and tuple(stored[name].shape) == stored.spec(name)[1]


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text("abcxyz._", min_size=1, max_size=6),
                       st.tuples(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]),
                                 st.lists(st.integers(0, 4), max_size=3)), max_size=5),
       st.booleans())
def test_streamed_safetensors_are_the_bytes_save_file_writes(tmp_path_factory, spec, with_metadata):
    from safetensors.torch import save_file
    from obliviate.engine.files import write_safetensors
    folder = tmp_path_factory.mktemp("st")
    tensors = {name: (torch.rand(shape) * 100).to(dtype) for name, (dtype, shape) in spec.items()}
    metadata = {"format": "pt"} if with_metadata else None
    save_file(tensors, folder / "reference", metadata=metadata)
    write_safetensors(tensors, folder / "streamed", metadata)
    assert (folder / "streamed").read_bytes() == (folder / "reference").read_bytes()
    # read back lazily, tensor by tensor, and streamed again through a lazy mapping
    stored = StoredTensors([("p.", folder / "reference")])
    assert sorted(stored) == sorted(f"p.{name}" for name in tensors)
    assert all(torch.equal(stored[f"p.{n}"], t) and stored[f"p.{n}"].dtype == t.dtype for n, t in tensors.items())
    write_safetensors(StoredTensors([("", folder / "reference")]), folder / "again", metadata)
    assert (folder / "again").read_bytes() == (folder / "reference").read_bytes()
