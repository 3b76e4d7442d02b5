"""Where a store lives: a local directory or any fsspec URL, and the few object operations the stores need.

The store protocol needs only that a whole object is written atomically (readers see the old object or the whole
new one, never a torn one) and that one writer can create a lock object exclusively. Locally that is a temporary
file, ``fsync`` and ``rename``, and ``O_EXCL``; on an object store (``s3://``, ``gs://``, ...) one PUT is atomic by
itself and exclusive creation is the backend's conditional write (S3 ``If-None-Match: *``). Local paths and
``file://`` URLs stay on the local code path; every other URL goes through fsspec with the credentials and endpoint
fsspec and the backend already read from the environment (for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_HASH_BLOCK = 1 << 20


def is_url(where: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (those are local paths)."""
    text = os.fspath(where) if not isinstance(where, Location) else where.url
    return "://" in text and not text.startswith("file://")


class Location:
    """A store, or an object or folder inside one. ``location / "name"`` is a child; ``str(location)`` is the path
    or URL as the user would type it. Use :meth:`of` to make one."""

    url: str

    @staticmethod
    def of(where: Location | str | os.PathLike[str]) -> Location:
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if is_url(text):
            return RemoteLocation(text)
        return LocalLocation(Path(text.removeprefix("file://")))

    @property
    def remote(self) -> bool:
        return isinstance(self, RemoteLocation)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, os.PathLike) and not isinstance(other, Location):
            return not self.remote and self.url == os.fspath(other)
        return isinstance(other, Location) and self.url == other.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_text_or_none(self) -> str | None:
        try:
            return self.read_text()
        except FileNotFoundError:
            return None

    def write_text(self, text: str) -> None:
        """Write the whole object atomically (see :meth:`write_bytes`)."""
        self.write_bytes(text.encode("utf-8"))

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with self.open_read() as handle:
            for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                digest.update(block)
        return digest.hexdigest()

    # ---- implemented by each kind ------------------------------------------------------------------------------
    def __truediv__(self, name: str) -> Location:
        raise NotImplementedError

    def is_empty_or_absent(self) -> bool:
        """Nothing at all lives here (no object and no object under it)."""
        raise NotImplementedError

    def read_bytes(self) -> bytes:
        raise NotImplementedError

    def open_read(self) -> contextlib.AbstractContextManager[IO[bytes]]:
        raise NotImplementedError

    def write_bytes(self, data: bytes) -> None:
        """Readers see the old object or the whole new one, even after a crash (durable when this returns)."""
        raise NotImplementedError

    def atomic_writer(self) -> contextlib.AbstractContextManager[IO[str]]:
        """A text handle whose content replaces the object atomically when the block ends without an error."""
        raise NotImplementedError

    def create_exclusive(self, data: bytes) -> bool:
        """Create the object with ``data`` only if it does not exist; False if it already did."""
        raise NotImplementedError

    def remove(self) -> None:
        """Delete the object (no error if it is absent)."""
        raise NotImplementedError

    def remove_tree(self) -> None:
        """Delete everything under this folder, and the folder."""
        raise NotImplementedError

    def children(self) -> list[Location]:
        """Direct children (objects and folders), sorted by name; none if this is not a folder."""
        raise NotImplementedError

    def child_folders(self) -> list[Location]:
        raise NotImplementedError

    def files(self) -> Iterator[tuple[Location, int]]:
        """Every object under this folder, recursively, with its size in bytes."""
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def make_durable(self) -> None:
        """Make an object written by someone else (zarr) durable before it is recorded."""
        raise NotImplementedError

    def zarr_store(self, read_only: bool = False) -> Any:
        """What ``zarr.open_group`` / ``zarr.open_array`` take for this folder."""
        raise NotImplementedError

    def tensorstore_kvstore(self) -> dict | None:
        """A TensorStore kvstore spec for this folder, or None where our reads go through zarr-python."""
        raise NotImplementedError


class LocalLocation(Location):
    """A local path: temporary file + fsync + rename for atomic writes, ``O_EXCL`` for exclusive creation."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = str(self.path)

    def __fspath__(self) -> str:
        return self.url

    def __truediv__(self, name: str) -> LocalLocation:
        return LocalLocation(self.path / name)

    def is_empty_or_absent(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def open_read(self) -> IO[bytes]:
        return open(self.path, "rb")

    @contextlib.contextmanager
    def _replacing(self, mode: str) -> Iterator[IO]:
        """A handle on a temporary file that replaces this one (fsync, rename, fsync of the folder) on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(self.path.parent)

    def atomic_writer(self) -> contextlib.AbstractContextManager[IO[str]]:
        return self._replacing("w")

    def write_bytes(self, data: bytes) -> None:
        with self._replacing("wb") as handle:
            handle.write(data)

    def create_exclusive(self, data: bytes) -> bool:
        """Atomic with its content: the data goes to a temporary file first (fsync), which is then hard-linked to
        this name, an operation that fails when the name exists. Readers never see the object empty or torn."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a store's cleanup of killed writes may remove our temporary file: write it again
            tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except FileNotFoundError:
                continue
            except OSError as error:
                if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                    raise
                return self._create_exclusive_without_links(data)  # a file system without hard links
            finally:
                tmp.unlink(missing_ok=True)
            fsync_path(self.path.parent)
            return True
        raise FileNotFoundError(f"{self.path}: the temporary file for an exclusive create kept disappearing")

    def _create_exclusive_without_links(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def remove_tree(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path)
        else:
            self.path.unlink(missing_ok=True)

    def children(self) -> list[Location]:
        return [LocalLocation(p) for p in sorted(self.path.iterdir())] if self.path.is_dir() else []

    def child_folders(self) -> list[Location]:
        return [c for c in self.children() if c.path.is_dir()]  # type: ignore[attr-defined]

    def files(self) -> Iterator[tuple[Location, int]]:
        for path in sorted(self.path.rglob("*")):
            if path.is_file():
                yield LocalLocation(path), path.stat().st_size

    def size(self) -> int:
        return self.path.stat().st_size

    def make_durable(self) -> None:
        fsync_path(self.path)

    def zarr_store(self, read_only: bool = False) -> Any:
        return self.path

    def tensorstore_kvstore(self) -> dict | None:
        return {"driver": "file", "path": str(self.path)}


class RemoteLocation(Location):
    """An fsspec URL. One PUT is atomic, so objects are written whole and directly; nothing needs a rename."""

    def __init__(self, url: str, _fs: Any = None, _path: str | None = None):
        self.url = url.rstrip("/")
        if _fs is None:
            import fsspec

            try:
                _fs, _path = fsspec.core.url_to_fs(self.url)
            except (ImportError, ValueError) as error:
                from stores.errors import StoreError

                raise StoreError(f"cannot open {self.url}: {error} (is the fsspec backend for it installed?)") \
                    from None
        self.fs, self.key = _fs, str(_path).rstrip("/")

    def __truediv__(self, name: str) -> RemoteLocation:
        return RemoteLocation(f"{self.url}/{name}", self.fs, f"{self.key}/{name}")

    def is_empty_or_absent(self) -> bool:
        with _backend(self.url):
            return not self.fs.exists(self.key) or (self.fs.isdir(self.key) and not self.fs.find(self.key, maxdepth=None))

    def read_bytes(self) -> bytes:
        with _backend(self.url):
            return self.fs.cat_file(self.key)

    def open_read(self) -> IO[bytes]:
        with _backend(self.url):
            return self.fs.open(self.key, "rb")

    @contextlib.contextmanager
    def atomic_writer(self) -> Iterator[IO[str]]:
        # An upload becomes visible only when it completes (PUT or multipart completion); an error aborts it.
        with self.fs.open(self.key, "w", encoding="utf-8") as handle:
            yield handle

    def write_bytes(self, data: bytes) -> None:
        with _backend(self.url):
            self.fs.pipe_file(self.key, data)

    def create_exclusive(self, data: bytes) -> bool:
        with _backend(self.url):
            try:
                with self.fs.open(self.key, "xb") as handle:  # conditional PUT where the backend has one
                    handle.write(data)
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError):  # backend without exclusive create: best effort, said in docs
                if self.fs.exists(self.key):
                    return False
                self.fs.pipe_file(self.key, data)
            return True

    def remove(self) -> None:
        with _backend(self.url), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key)

    def remove_tree(self) -> None:
        with _backend(self.url), contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.key, recursive=True)

    def _entries(self) -> list[dict]:
        with _backend(self.url):
            try:
                return sorted(self.fs.ls(self.key, detail=True, refresh=True), key=lambda e: e["name"])
            except FileNotFoundError:
                return []

    def _child(self, entry: dict) -> RemoteLocation:
        return self / entry["name"].rstrip("/").rsplit("/", 1)[-1]

    def children(self) -> list[Location]:
        return [self._child(e) for e in self._entries() if e["name"].rstrip("/") != self.key]

    def child_folders(self) -> list[Location]:
        return [self._child(e) for e in self._entries() if e.get("type") == "directory"]

    def files(self) -> Iterator[tuple[Location, int]]:
        with _backend(self.url):
            try:
                found = self.fs.find(self.key, detail=True)
            except FileNotFoundError:
                return
            for name, info in sorted(found.items()):
                yield RemoteLocation(f"{self.url}/{name[len(self.key) + 1:]}", self.fs, name), int(info.get("size") or 0)

    def size(self) -> int:
        with _backend(self.url):
            return int(self.fs.size(self.key))

    def make_durable(self) -> None:
        pass  # an acknowledged PUT is durable

    def zarr_store(self, read_only: bool = False) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, read_only=read_only)

    def tensorstore_kvstore(self) -> dict | None:
        """TensorStore's own S3 / GCS driver for this folder, configured as fsspec's backend is (endpoint, region,
        environment credentials); None for other backends. If TensorStore cannot open it, reads use zarr-python."""
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        bucket, _, path = self.key.partition("/")
        if protocols & {"gs", "gcs"}:
            return {"driver": "gcs", "bucket": bucket, "path": f"{path}/"}
        if "s3" not in protocols:
            return None
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": f"{path}/"}
        endpoint = (getattr(self.fs, "endpoint_url", None) or self.fs.client_kwargs.get("endpoint_url")
                    or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint:
            spec["endpoint"] = endpoint
        region = self.fs.client_kwargs.get("region_name") or os.environ.get("AWS_REGION") \
            or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
        if os.environ.get("AWS_ACCESS_KEY_ID"):  # else profiles, instance roles, ...: the SDK's default chain
            spec["aws_credentials"] = {"type": "environment"}
        return spec


@contextlib.contextmanager
def _backend(url: str) -> Iterator[None]:
    """Errors of a remote backend (no credentials, access denied, unreachable endpoint) as one StoreError naming the
    URL; "not found" and "exists" pass through, the stores rely on them."""
    from stores.errors import StoreError

    try:
        yield
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, StoreError):
        raise
    except Exception as error:  # noqa: BLE001 - each backend has its own exception tree
        raise StoreError(f"{url}: the storage backend failed: {type(error).__name__}: {error}") from error


def fsync_path(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to the disk, so a rename never publishes unwritten bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
