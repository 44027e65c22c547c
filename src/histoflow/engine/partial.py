"""The journal of a run in progress: ``OUT.h5path.partial/``, one file per finished batch.

Each batch file is written atomically (temporary name, then rename), so a run killed at any moment
leaves only whole batches behind; ``resume=True`` reads them and runs the rest. Batch files carry the
journal's token in their name: a task of an earlier, stopped run that finishes late (on a cluster that
outlives the run) writes a file that no later run of another journal reads. When every batch is
there, the batches are copied in grid order into the final h5path (chunks are copied as bytes, not
recompressed) and the folder is removed. A batch file (``.hfb``) is a JSON header and the tiles' compressed
bytes after it (no pickle; see :func:`write_batch`); the manifest is JSON.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
import warnings
import zlib

import numpy as np

from ..errors import OutputError, PipelineError
from ..store.h5path import EncodedTile, _ArrayChunk
from .worker import BatchResult, Failure

MANIFEST = "manifest.json"
BATCH_SUFFIX = ".hfb"
#: first bytes of a batch file; then the header's length (8 bytes, little-endian), the CRC-32 of everything after
#: it (4 bytes), the JSON header and the chunks' bytes
BATCH_MAGIC = b"histoflow-batch-1\n"
_PREFIX = len(BATCH_MAGIC) + 12


def partial_dir(out_path: str) -> str:
    return os.fspath(out_path) + ".partial"


def start(out_path: str, manifest: dict, resume: bool, replace_other: bool = False) -> tuple[str, set, str]:
    """Prepare the journal folder; return it, the batches already done (when resuming) and its token.

    Without ``resume`` the journal of an unfinished run is removed and the run starts over, with a warning
    that says how many finished batches that discards; with ``resume`` and ``replace_other``, so is the journal
    of a run with other settings (or whose settings cannot be read), instead of being refused."""
    d = partial_dir(out_path)
    _remove_leftovers(d)
    if os.path.isdir(d):
        old = _read_manifest(d)
        token = old.pop("token", None) if old is not None else None
        if resume and old is not None and not (replace_other and (old != manifest or token is None)):
            if old != manifest or token is None:
                diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                was, now = old.get("inputs") or {}, manifest.get("inputs") or {}
                pf_was, pf_now = was.get("pipeline_files") or {}, now.get("pipeline_files") or {}
                files = sorted(f for f in pf_was.keys() | pf_now.keys() if pf_was.get(f) != pf_now.get(f))
                what = ("the slide file changed since (another file at the same path)" if diff == ["inputs"] and
                        was.get("file") != now.get("file") else
                        f"a file the pipeline reads changed since ({', '.join(files)}: other weights at the same "
                        "path would mix two models' tiles in one store)" if diff == ["inputs"] and files
                        else f"the unfinished run used other settings ({', '.join(diff) or 'journal'})")
                raise PipelineError(f"{out_path}: cannot resume: {what}; run without resume to start over")
            return d, _whole_batches(d, token), token
        n = len(done_batches(d, token)) if token is not None else batch_count(d)
        if resume and n and not replace_other:  # the manifest is gone or damaged: the batches cannot be checked,
            # but are not thrown away
            raise PipelineError(f"{out_path}: cannot resume: the journal's {os.path.join(d, MANIFEST)} is missing "
                                f"or unreadable, so its {n} finished batch(es) cannot be matched to this run's "
                                f"settings; they are kept. Run without resume to start over (that removes {d})")
        shutil.rmtree(d)
        if n and resume:  # replace_other: a run of other settings (or of settings that cannot be read)
            warnings.warn(f"{out_path}: an unfinished run's journal {d} held {n} finished batch(es) of other "
                          "settings (or of settings it no longer says); they are discarded and this slide starts "
                          "over (overwrite=True)", stacklevel=5)
        elif n:  # deliberate (a run without resume starts over), but not silently: the work is lost
            warnings.warn(f"{out_path}: an unfinished run's journal {d} held {n} finished batch(es); they are "
                          "discarded and the run starts over (resume=True, `--resume` on the command line, would "
                          "have continued from them)", stacklevel=5)
    token = uuid.uuid4().hex[:12]
    try:
        os.makedirs(d)
        _write_json(os.path.join(d, MANIFEST), {**manifest, "token": token})
    except OSError as e:
        raise OutputError(f"{out_path}: cannot write there: cannot make the run's journal folder {d}: "
                          f"{e.strerror or e}") from None
    return d, set(), token


def _read_manifest(d):
    """The journal's manifest, or None when it is missing, unreadable or not a JSON object."""
    try:
        with open(os.path.join(d, MANIFEST)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _whole_batches(d: str, token: str) -> set:
    """The finished batches whose files are whole (their checksum holds). A damaged one is removed, with a
    warning, and run again, rather than found only at the merge after all the other work (whose advice then
    was to throw the whole journal away)."""
    done = done_batches(d, token)
    bad = []
    for b in sorted(done):
        try:
            _check_file(batch_path(d, b, token))
        except (OSError, ValueError) as e:
            bad.append((b, e))
    for b, e in bad:
        done.discard(b)
        try:
            os.remove(batch_path(d, b, token))
        except OSError:
            shutil.rmtree(batch_path(d, b, token), ignore_errors=True)
    if bad:
        warnings.warn(f"{d}: {len(bad)} finished batch file(s) of the interrupted run are damaged "
                      f"({bad[0][1]}{', ...' if len(bad) > 1 else ''}); they are run again", stacklevel=5)
    return done


def _check_file(path):
    """Raise ValueError unless ``path`` is a whole batch file (magic, lengths and CRC-32), without parsing it."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _PREFIX or not data.startswith(BATCH_MAGIC):
        raise ValueError(f"{os.path.basename(path)} is not a whole batch file")
    n_header = int.from_bytes(data[len(BATCH_MAGIC):len(BATCH_MAGIC) + 8], "little")
    if _PREFIX + n_header > len(data) or \
            zlib.crc32(memoryview(data)[_PREFIX:]) != int.from_bytes(data[_PREFIX - 4:_PREFIX], "little"):
        raise ValueError(f"{os.path.basename(path)} is damaged (checksum mismatch)")


def _write_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def batch_path(d: str, batch: int, token: str) -> str:
    return os.path.join(d, f"batch-{batch:07d}-{token}{BATCH_SUFFIX}")


def batch_count(d: str) -> int:
    """The finished batch files in the journal folder ``d``, of whatever run (0 when there is no such folder)."""
    try:
        return sum(name.startswith("batch-") and name.endswith(BATCH_SUFFIX) for name in os.listdir(d))
    except OSError:
        return 0


def done_batches(d: str, token: str) -> set:
    out = set()
    suffix = f"-{token}{BATCH_SUFFIX}"
    for name in os.listdir(d):
        if name.startswith("batch-") and name.endswith(suffix):
            try:
                out.add(int(name[6:-len(suffix)]))
            except ValueError:
                pass
    return out


def write_batch(d: str, result: BatchResult, token: str):
    """Store one finished batch (its encoded tiles and failures) atomically.

    The file is ``BATCH_MAGIC``, the length of a JSON header (8 bytes, little-endian), the header (tiles:
    coordinates, labels, and the offset and length of each chunk; failures), then the chunks' bytes as they
    go into the h5path, with a CRC-32 of header and chunks (the merge copies chunks without decoding them: a
    damaged file must not pass): a simple layout that workers write and the driver reads back without parsing
    an archive (``.npz`` cost ~1 ms a batch on each side)."""
    meta = {"tiles": [], "failures": [f.as_dict() for f in result.failures]}
    blobs, offset = [], 0

    def put(data) -> list:
        nonlocal offset
        blobs.append(data)
        offset += len(data)
        return [offset - len(data), len(data)]

    for index, enc in result.tiles:
        meta["tiles"].append({
            "index": index, "coords": list(enc.coords), "level": enc.level, "downsample": enc.downsample,
            "name": enc.name, "labels": enc.labels, "compression": enc.compression,
            "compression_level": enc.compression_level,
            "image": [put(enc.image.data), list(enc.image.shape), enc.image.dtype],
            "masks": {k: [put(m.data), list(m.shape), m.dtype, m.is_bool] for k, m in enc.masks.items()},
            "cells": None if enc.cells is None else {k: [put(a.tobytes()), list(a.shape), a.dtype.str]
                                                     for k, a in enc.cells.items()},
            "core": None if enc.core is None else list(enc.core),
        })
    header = json.dumps(meta, default=_json_default).encode()
    crc = zlib.crc32(header)
    for data in blobs:
        crc = zlib.crc32(data, crc)
    path = batch_path(d, result.batch, token)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(BATCH_MAGIC + len(header).to_bytes(8, "little") + crc.to_bytes(4, "little") + header)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def read_batch(d: str, batch: int, token: str) -> BatchResult:
    """A batch file back as a :class:`BatchResult`. A file that is not whole, not one of ours, damaged (its
    CRC-32 differs) or malformed raises :class:`PipelineError` naming it."""
    path = batch_path(d, batch, token)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < _PREFIX or not data.startswith(BATCH_MAGIC):
            raise ValueError("not a histoflow batch file")
        n_header = int.from_bytes(data[len(BATCH_MAGIC):len(BATCH_MAGIC) + 8], "little")
        end = _PREFIX + n_header
        if end > len(data):
            raise ValueError("truncated header")
        if zlib.crc32(memoryview(data)[_PREFIX:]) != int.from_bytes(data[_PREFIX - 4:_PREFIX], "little"):
            raise ValueError("checksum mismatch: the file is damaged")
        meta = json.loads(data[_PREFIX:end])
        size = len(data) - end

        def chunk(ref):
            o, n = _ints(ref, 2, "chunk reference")
            if o + n > size:
                raise ValueError(f"a chunk ({o}, {n}) lies outside the file's {size} bytes of data")
            return data[end + o:end + o + n]

        out = BatchResult(batch)
        for t in meta["tiles"]:
            ref, shape, dtype = t["image"]
            image = _ArrayChunk(chunk(ref), _ints(shape, 3, "image shape"), np.dtype(dtype).str)
            masks = {str(k): _ArrayChunk(chunk(r2), _ints(s2, 2, "mask shape"), np.dtype(dt2).str, bool(b2))
                     for k, (r2, s2, dt2, b2) in t["masks"].items()}
            cells = None
            if t.get("cells") is not None:
                cells = {str(k): np.frombuffer(chunk(r3), np.dtype(dt3)).reshape(_ints(s3, None, "cells shape")).copy()
                         for k, (r3, s3, dt3) in t["cells"].items()}
            enc = EncodedTile(image, _ints(t["coords"], 2, "coords", None), int(t["level"]), float(t["downsample"]),
                              masks, t["labels"], t["name"], t["compression"], t["compression_level"], cells,
                              None if t.get("core") is None else _ints(t["core"], 4, "core"))
            out.tiles.append((int(t["index"]), enc))
        out.failures = [Failure(**f) for f in meta["failures"]]
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or hostile file, whatever broke: name it
        raise PipelineError(f"{path}: unreadable batch file of an unfinished run ({type(e).__name__}: {e}); "
                            f"remove {d} to start over") from None
    return out


def _ints(values, n, what, lowest=0) -> tuple:
    """A list of ``n`` (any number when None) whole numbers >= ``lowest`` from the header, as a tuple."""
    if not isinstance(values, list) or (n is not None and len(values) != n) or \
            not all(isinstance(v, int) and not isinstance(v, bool) and (lowest is None or v >= lowest)
                    for v in values):
        raise ValueError(f"{what} {values!r} is not {n or 'a list of'} whole numbers"
                         + ("" if lowest is None else f" >= {lowest}"))
    return tuple(values)


#: what a journal folder is renamed to before it is removed
_REMOVING = ".removing-"


def remove(d: str):
    """Remove a journal folder: renamed first (one atomic step), then deleted. A run killed while deleting leaves
    a ``<journal>.removing-...`` folder that the next run on that output deletes, never a journal without its
    manifest that would block ``--resume`` and plain runs alike."""
    gone = f"{d}{_REMOVING}{uuid.uuid4().hex[:8]}"
    try:
        os.rename(d, gone)
    except OSError:
        gone = d
    shutil.rmtree(gone, ignore_errors=True)


def _remove_leftovers(d: str):
    """Journal folders of ``d``'s output that a killed run left half removed."""
    parent, base = os.path.split(os.path.abspath(d))
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return
    for name in names:
        if name.startswith(base + _REMOVING):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


LOCK_SUFFIX = ".lock"


class OutputLock:
    """An exclusive hold on one output path for the length of a run: ``OUT.h5path.lock`` beside it, locked with
    ``flock``. A second run on the same output (another process, another terminal) is refused at once instead of
    removing the first one's journal under it or writing the same file. The operating system drops the lock when
    the process ends however it ends, so a killed run leaves no stale hold (only the file, which names the process
    that held it and which the next run on that output takes over and removes). Where ``fcntl`` is missing (Windows) there is no lock."""

    def __init__(self, out_path: str):
        self.out = os.fspath(out_path)
        self.path = self.out + LOCK_SUFFIX
        self.fd = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux / macOS
            return self
        if _HELD[0] >= _lock_budget():  # leave the process files to open for its work (journals, slides)
            _warn_unlocked(self.out, OSError(errno.EMFILE, "too many open files"))
            return self
        for _ in range(20):  # the file may be removed by the run releasing it between our open and our lock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):  # more outputs than the process may open files
                    _warn_unlocked(self.out, e)
                    return self
                raise OutputError(f"{self.out}: cannot write there: cannot make the run's lock file {self.path}: "
                                  f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(f"{self.out}: another histoflow run{holder} is writing this output; wait for it "
                                  f"to finish (or stop it), or write elsewhere. If no such run exists, remove "
                                  f"{self.path}") from None
            except OSError:  # a file system without locks: run unguarded, as without fcntl, leaving no file
                os.close(fd)
                try:
                    os.remove(self.path)
                except OSError:
                    pass
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, json.dumps({"pid": os.getpid(), "host": _hostname(),
                                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
                except OSError:
                    pass  # who holds it is only for the message of a refused run
                self.fd = fd
                _HELD[0] += 1
                return self
            os.close(fd)  # we locked a file that was removed meanwhile: take the new one
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still held, so no other run locks the removed file and thinks it alone
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        _HELD[0] -= 1


_SAID_UNLOCKED = []
_HELD = [0]  # lock files this process holds open


def _lock_budget() -> int:
    """How many lock files the process may hold: its limit on open files less 256 for everything else."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):  # pragma: no cover
        return 1 << 30
    return (1 << 30) if soft == resource.RLIM_INFINITY else max(0, soft - 256)


def _warn_unlocked(out, e):
    if not _SAID_UNLOCKED:
        _SAID_UNLOCKED.append(out)
        warnings.warn(f"{out}: this run writes more outputs than it can hold lock files open for ({e.strerror or e} "
                      "otherwise): from this one on they are not kept from other runs (give each run its own "
                      "outputs)", stacklevel=4)


def allow_open_files(n: int):
    """Raise the process's limit on open files (its soft limit, up to the hard one) so that ``n`` more can be
    open: a run holds a lock file for each output it writes (thousands for a large SlideDataset)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux / macOS
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                    hard))
    except (ValueError, OSError):  # pragma: no cover - not allowed here: locks beyond the limit are skipped
        pass


def _hostname() -> str:
    import socket

    try:
        return socket.gethostname()
    except OSError:  # pragma: no cover
        return "?"


def _read_holder(fd) -> str:
    """' (process 123 on host, since ...)' from a held lock file, or '' when it says nothing readable."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f" (process {int(info['pid'])} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return ""
