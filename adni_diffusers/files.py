"""The file-system steps every stage shares: a path removed whatever it is, a folder replaced in one rename.

A crash (a full disk, a job's time limit) may come between any two steps: each leaves the old folder or the new
one, never half of either, and the leftovers are `.tmp` names the next start removes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path


def remove_path(path: Path, ignore_errors: bool = False) -> None:
    """Remove a file, a folder or a link (the link only, never what it points at); a missing path is fine."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=ignore_errors)


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target`: the earlier one (or a link there) goes aside in one rename first,
    so that a crash while deleting it leaves `<target>.old.tmp`, not a half-deleted `target`."""
    new, target = Path(new), Path(target)
    aside = target.with_name(f"{target.name}.old.tmp")
    remove_path(aside, ignore_errors=True)
    if target.is_symlink() or target.exists():
        os.replace(target, aside)
    os.replace(new, target)
    remove_path(aside, ignore_errors=True)


def dangling_link(path: Path) -> Path | None:
    """`path` or the first of its parents that is a link to something that does not exist, or None."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)


def not_a_folder(path: Path) -> str | None:
    """Why `path` cannot be (or be made) a folder, or None: it is a file, or one of its parents is (mkdir's bare
    "[Errno 20] Not a directory" names no flag)."""
    path = Path(path)
    # a link to a folder that is gone (a scratch folder purged, not yet made): mkdir's bare "[Errno 17] File exists"
    if dangling := dangling_link(path):
        return f"{dangling} is a link to {os.readlink(dangling)}, which does not exist"
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return None
    return "exists and is not a folder" if existing == path else f"{existing} is a file, not a folder"


def cannot_write_in(folder: Path) -> str | None:
    """Why no file can be written in `folder` (made later where missing), or None: a temporary file is made and gone
    in it, or in its nearest existing parent, and nothing else is made or removed. A read-only mount or a path under
    /proc failed only at the first file, after the model had loaded, with an error that named no flag."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.is_symlink() and not path.exists():  # mkdir would fail later ("File exists") on the link
            return f"{path} is a link to {os.readlink(path)}, which does not exist"
        if path.exists():
            break
    else:
        return None
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".write_check-"):
            pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return None


def weights_only_as_pickle(folder: Path) -> str | None:
    """Why a model folder's weights will not be loaded, or None: it holds them only as pickle files (.bin), which
    can run code when loaded, and this package loads safetensors only. (diffusers would read them, with a warning
    about "unsafe serialization" the only sign.)"""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return None
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if not pickles:
        return None
    return (f"{folder} holds its weights only as pickle ({', '.join(pickles)}), which can run code when loaded; "
            "adni-diffusers loads safetensors only: where the model was made, save it again with save_pretrained "
            "(safetensors is its default)")


def write_text_atomically(path: Path, text: str) -> None:
    """`text` into `path` whole or not at all (a `.tmp` beside it, renamed): a crash while writing leaves the
    earlier file, never half of one (a record cut short was unreadable, and what it described nobody's)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half .tmp left beside the record
        with contextlib.suppress(OSError):  # (a read-only folder fails the removal too: the first error counts)
            tmp.unlink(missing_ok=True)
        raise


# how torch.save (PyTorchStreamWriter) and safetensors report a write that failed (a full disk, a quota, a
# read-only filesystem): a RuntimeError ("basic_ios::clear: iostream error", "unexpected pos 136576 vs 136464") or a
# SafetensorError ("IoError(Os { code: 28 ... })"), neither naming the file
WRITE_FAILURE_RE = re.compile(r"no space left|read-only file system|quota|iostream error|unexpected pos|"
                              r"PytorchStreamWriter failed|file write failed|ioerror|os error", re.IGNORECASE)
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


@contextlib.contextmanager
def writing(folder, what: str):
    """Around a write of `what` into `folder`. A failed write that torch or safetensors report in their own words,
    or an OSError that names no file, is raised as an OSError naming `what`, the folder and the room left there:
    a training run then says which checkpoint to go on from (it printed two torch tracebacks and no way on)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno not in DISK_FULL_ERRNOS:
            raise
        raise OSError(e.errno, f"{e.strerror} while writing {what} in {folder} ({free_space(folder)} free)") from e
    except Exception as e:  # noqa: BLE001 - only a failed write's own words are re-raised, as an OSError
        if not WRITE_FAILURE_RE.search(str(e)):
            raise
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        code = errno.EROFS if "read-only" in str(e).lower() else errno.ENOSPC if "space" in str(e).lower() \
            else errno.EIO
        raise OSError(code, f"writing {what} in {folder} failed ({type(e).__name__}: {first_line}); "
                            f"{free_space(folder)} free there: a full disk or a read-only folder?") from e


def free_space(folder) -> str:
    """The room left on `folder`'s filesystem (its nearest existing parent's), e.g. "1.2 GB"; "unknown" where it
    cannot be read."""
    path = Path(folder).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    return f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"


def jsonable(x):
    """Valid JSON: NaN and inf -> null (Python's json writes the bare NaN that strict parsers refuse), numpy
    scalars -> numbers, dict keys -> strings."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) or math.isinf(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def read_json_object(path: Path) -> dict:
    """The JSON object (dict) in `path`; {} when the file is missing or unreadable, is not JSON, or holds another
    kind of value (a hand-edited or foreign record): readers of our records then find no entry, not a crash."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # (UnicodeDecodeError is a ValueError)
        return {}
    return record if isinstance(record, dict) else {}


def write_json_atomically(path: Path, record) -> None:
    """`record` as strict JSON (`jsonable`), written whole or not at all (`write_text_atomically`)."""
    write_text_atomically(path, json.dumps(jsonable(record), indent=2, allow_nan=False) + "\n")


def fsync_file(path: Path) -> None:
    """The file on disk, not only in the page cache, before the rename that publishes it (after a node crash a
    renamed file whose data was never written reads as zeros or cut short)."""
    # Windows' fsync (FlushFileBuffers) needs a handle that may write: on a read-only one it raises EBADF
    with open(path, "r+b" if os.name == "nt" else "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(folder: Path) -> None:
    """Every file under `folder` on disk (`fsync_file`) before the rename that publishes it."""
    for p in folder.rglob("*"):
        if p.is_file():
            fsync_file(p)


def read_as_data(folder: Path, data: Path) -> bool:
    """Whether files in `folder` would be read as part of the data folder `data`: inside it, and not under a
    folder the scan skips (a dot-folder such as .cache/, or a "__..." one, as datasets skips them). Inside it
    through a linked folder too: the scan follows links (a split folder linked to a cluster's central copy,
    data/train -> /shared/ADNI/train), so a folder under the link's target is read as data/train/..."""
    folder = Path(folder).resolve()

    def under(real: Path) -> bool:
        return folder.is_relative_to(real) and not any(part.startswith((".", "__"))
                                                       for part in folder.relative_to(real).parts)

    if under(Path(data).resolve()):
        return True
    visited = set()
    for dirpath, dirnames, _ in os.walk(data, followlinks=True):  # the folders the scan reads, where they really are
        real = os.path.realpath(dirpath)
        if real in visited:  # a link back to a parent
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        if under(Path(real)):
            return True
    return False


# flags whose values are not paths: a commit message or a class name may start with "~" as it likes
NOT_PATHS = frozenset({"commit_message", "token", "hub_token", "class_name", "label", "repo_id", "hub_model_id",
                       "branch", "to", "class_label", "source"})


def expand_home(args) -> None:
    """`~` at the start of a path flag's value (`~/runs/vq`, `~`) as the user's home folder, in `args` (an
    argparse Namespace). The shell leaves it as it is where it is quoted or follows `=` (`--output_dir=~/runs/vq`,
    common in job scripts): the run then wrote into a folder named `~` in the working folder, while its messages
    said `~/runs/vq`, which a shell reads as the home folder (and `rm -rf ~` clears the wrong one)."""
    def home(value):
        return os.path.expanduser(value) if isinstance(value, str) and (value == "~" or value.startswith("~/")) \
            else value

    for name, value in vars(args).items():
        if name not in NOT_PATHS:
            setattr(args, name, [home(v) for v in value] if isinstance(value, list) else home(value))


# ----------------------------------------------------------------------------------- one writer at a time
LOCK_FILE = ".adni-diffusers.lock"  # a dot-file: no data scan, push or output listing counts it


class FolderInUse(RuntimeError):
    """Another process of this package writes into the folder now (it holds the folder's LOCK_FILE)."""


def _holder(lock: Path) -> str:
    """Who holds `lock`, as its holder wrote it ("generate, pid 123 on host, started ...")."""
    try:
        return lock.read_text(encoding="utf-8").strip() or "a process"
    except OSError:
        return "a process"


def _owner(path: Path) -> str:
    """Who owns `path`: "user NAME" (or "uid N")."""
    try:
        uid = path.stat().st_uid
    except OSError:
        return "its owner unknown"
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name}"
    except (ImportError, KeyError):
        return f"uid {uid}"


def folder_in_use(folder: Path, by_others_only: bool = False) -> str | None:
    """Who writes into `folder` now (its LOCK_FILE is locked), else None; nothing is made or changed.
    `by_others_only`: None where the holder is this process (train_unet's own final evaluation of its folder)."""
    lock = Path(folder) / LOCK_FILE
    if os.name == "nt" or not lock.is_file():
        return None
    import fcntl
    import socket

    try:
        with open(lock, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(lock)
                if by_others_only and f", pid {os.getpid()} on {socket.gethostname()}, " in holder:
                    return None
                return holder
    except OSError:  # unreadable, or a filesystem without flock: nothing can be told
        return None
    return None


@contextlib.contextmanager
def only_writer(folder: Path, flag: str, what: str):
    """Around the writes of `what` (a command's name) into `folder` (made where missing, and removed again where it is
    left empty): an exclusive lock on its LOCK_FILE, released when the block ends or the process dies (flock: never
    a stale lock after a kill), and the file removed again at the end. A second run into the same folder (a job
    array's tasks given one --out, a rerun while the first still writes) is refused with a FolderInUse naming the
    first; without the lock both wrote, each over the other's files, and the record of one run sat beside the other's
    outputs. Where the filesystem takes no flock (some network mounts), or on Windows, the block runs unguarded."""
    folder = Path(folder)
    if os.name == "nt":
        yield
        return
    import fcntl
    import socket
    from datetime import datetime

    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    while True:
        try:  # (not truncated before the lock is ours: the holder's words stay)
            fh, mine = open(lock, "a+", encoding="utf-8"), True
            with contextlib.suppress(OSError):  # readable to the others (a umask of 077 made it 0600): a labmate's
                os.fchmod(fh.fileno(), 0o644)  # run into this shared folder locks it too, or names who holds it
        except PermissionError:  # another user's lock file in a shared folder: locked all the same, not written
            try:
                fh, mine = open(lock, encoding="utf-8"), False
            except PermissionError:  # another user's, made 0600 (before this version, or by hand): no lock to take
                raise FolderInUse(f"{flag} {folder}: its lock file {lock} cannot be opened (another user's, "
                                  f"{_owner(lock)}): a run of theirs writes there now, or was cut short there; give "
                                  f"another {flag}, or ask them to remove that file once no run of theirs is "
                                  "writing there") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise FolderInUse(f"{flag} {folder}: another run is writing there now ({_holder(lock)}); wait for it "
                              f"to end, or give another {flag}") from None
        except OSError:  # no flock on this filesystem
            fh.close()
            fh = None
            break
        try:  # the file locked is still the one at `lock`, not one its last holder removed as it ended
            if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:
        if fh is not None and mine:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{what}, pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{datetime.now().astimezone().isoformat(timespec='seconds')}\n")
            fh.flush()
        yield
    finally:
        if fh is not None:
            with contextlib.suppress(OSError):  # removed while still held: the next run locks a file of its own
                lock.unlink()
            fh.close()  # (releases the lock)
        if made:  # a run refused before it wrote anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
