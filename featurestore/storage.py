"""Where data lives: a local path or an object-storage URI (`s3://bucket/prefix`), as pyarrow and Lance
need it. Every module that reads MELD or the store goes through here, so both work the same on a
local disk and on S3 (or an S3-compatible server such as SeaweedFS or MinIO).

    location("s3://bucket/store")      -> "s3://bucket/store" (a str); location("data/store") -> Path
    filesystem(loc)                    -> (pyarrow FileSystem, path inside it)
    lance_options(loc)                 -> Lance `storage_options` (None for a local path)
    with local_copy("s3://b/x.mp4") as path: ...   # a worker-local temp copy, deleted after

Endpoint and credentials: what `configure()` was given (the config's `storage` section), else the
standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION);
never a file in the repository. A wrong key, a missing bucket or an unreachable endpoint is a
`StorageError` of one line naming the URI and the cause.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Union

import pyarrow.fs as pafs

Location = Union[Path, str]  # a local path, or an object-storage URI kept as a str

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
SCHEMES = ("s3",)
DEFAULT_REGION = "us-east-1"  # what S3-compatible servers expect when none is given


class StorageError(OSError):
    """Object storage could not be reached or used: one line naming the URI and the cause."""


@dataclass(frozen=True)
class S3Settings:
    """Endpoint and credentials for s3:// URIs; a None field falls back to its AWS variable."""

    endpoint: str | None = None  # e.g. http://127.0.0.1:8333; None: AWS itself
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None

    def resolved(self) -> "S3Settings":
        env = os.environ.get
        return S3Settings(
            endpoint=self.endpoint or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
            region=self.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
            access_key_id=self.access_key_id or env("AWS_ACCESS_KEY_ID"),
            secret_access_key=self.secret_access_key or env("AWS_SECRET_ACCESS_KEY"),
        )

    def as_dict(self) -> dict[str, str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_configured = S3Settings()


def configure(settings: S3Settings | dict | None) -> None:
    """Set this process's endpoint and credentials (fields left None still come from the AWS variables).
    Ray tasks that read or write object storage get the driver's settings and call this first."""
    global _configured
    if isinstance(settings, dict):
        settings = S3Settings(**settings)
    _configured = settings or S3Settings()


def settings() -> S3Settings:
    """The settings in force: `configure()`'s, completed from the AWS variables."""
    return _configured.resolved()


# ---- locations -------------------------------------------------------------------------------------
def is_uri(value: object) -> bool:
    return isinstance(value, str) and _URI.match(value) is not None


def location(value: Location) -> Location:
    """A URI stays a str (without a trailing slash); anything else is a local Path."""
    if isinstance(value, str) and (match := _URI.match(value)):
        scheme = match.group(1).lower()
        if scheme not in SCHEMES:
            raise StorageError(f"{value}: {scheme}:// is not supported; use a local path or s3://bucket/prefix "
                               "(GCS and other stores through their S3-compatible endpoint)")  # fmt: skip
        if not match.group(2).strip("/"):
            raise StorageError(f"{value}: no bucket in the URI (expected s3://bucket/prefix)")
        return f"{scheme}://{match.group(2).rstrip('/')}"
    return Path(value)


def join(base: Location, *parts: str) -> Location:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(base).joinpath(*parts)


def name(loc: Location) -> str:
    """The last part of a path or URI (`.../utterances.lance` -> `utterances.lance`)."""
    return str(loc).rstrip("/").rsplit("/", 1)[-1]


def parent(loc: Location) -> Location:
    return str(loc).rstrip("/").rsplit("/", 1)[0] if is_uri(loc) else Path(loc).parent


def as_string(loc: Location) -> str:
    """What Lance and messages take: the URI, or the absolute local path."""
    return str(loc) if is_uri(loc) else str(Path(loc).absolute())


def bucket_and_key(uri: str) -> tuple[str, str]:
    rest = _URI.match(uri).group(2)
    bucket, _, key = rest.partition("/")
    return bucket, key


# ---- pyarrow and Lance -----------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _s3(current: S3Settings) -> pafs.S3FileSystem:
    endpoint = current.endpoint
    scheme = "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    return pafs.S3FileSystem(
        access_key=current.access_key_id, secret_key=current.secret_access_key,
        region=current.region or DEFAULT_REGION, endpoint_override=endpoint, scheme=scheme,
        connect_timeout=5, request_timeout=60, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )  # fmt: skip


def filesystem(loc: Location) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that holds `loc`, and its path there."""
    if is_uri(loc):
        bucket, key = bucket_and_key(str(loc))
        return _s3(settings()), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(loc).absolute())


def lance_options(loc: Location) -> dict[str, str] | None:
    """Lance's `storage_options` for `loc` (None for a local path)."""
    if not is_uri(loc):
        return None
    current = settings()
    options = {"aws_region": current.region or DEFAULT_REGION}
    if current.access_key_id:
        options.update(aws_access_key_id=current.access_key_id, aws_secret_access_key=current.secret_access_key or "")
    if current.endpoint:
        options["aws_endpoint"] = current.endpoint
        if current.endpoint.startswith("http://"):
            options["allow_http"] = "true"
    return options


# ---- small file operations -------------------------------------------------------------------------
def exists(loc: Location) -> bool:
    if not is_uri(loc):
        return Path(loc).exists()
    fs, path = filesystem(loc)
    return _call(loc, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def is_dir(loc: Location) -> bool:
    if not is_uri(loc):
        return Path(loc).is_dir()
    fs, path = filesystem(loc)
    return _call(loc, lambda: fs.get_file_info(path).type == pafs.FileType.Directory)


def list_dir(loc: Location) -> dict[str, pafs.FileInfo]:
    """Name -> FileInfo (type, size, mtime) of the entries directly under `loc`; {} when it is absent.
    One listing call on object storage, however many entries."""
    if not is_uri(loc) and not Path(loc).is_dir():
        return {}
    fs, path = filesystem(loc)
    infos = _call(loc, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return {info.base_name: info for info in infos}


def read_bytes(loc: Location) -> bytes:
    if not is_uri(loc):
        return Path(loc).read_bytes()
    fs, path = filesystem(loc)
    with _call(loc, lambda: fs.open_input_stream(path)) as stream:
        return stream.read()


def open_input_file(loc: Location):
    """A seekable file object (pyarrow's) over `loc`, for readers that need only part of it (a header)."""
    fs, path = filesystem(loc)
    return _call(loc, lambda: fs.open_input_file(path))


def write_bytes(loc: Location, data: bytes) -> None:
    fs, path = filesystem(loc)
    if not is_uri(loc):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _call(loc, lambda: fs.open_output_stream(path)) as stream:
        stream.write(data)


def delete_file(loc: Location) -> None:
    fs, path = filesystem(loc)
    _call(loc, lambda: fs.delete_file(path))


def upload_tree(local: Path, uri: str) -> None:
    """Copy a local folder to object storage (e.g. a generated mini-MELD), keeping its layout."""
    fs, path = filesystem(uri)
    _call(uri, lambda: pafs.copy_files(str(Path(local).absolute()), path, source_filesystem=pafs.LocalFileSystem(),
                                       destination_filesystem=fs, use_threads=True))  # fmt: skip


def check_access(loc: Location, write: bool = False) -> None:
    """Fail now, in one line, when `loc` is on object storage that cannot be reached, has no such bucket or
    refuses the credentials (with `write`, refuses a write); nothing is checked for a local path."""
    if not is_uri(loc):
        return
    fs, path = filesystem(loc)
    bucket = path.split("/", 1)[0]
    _call(loc, lambda: fs.get_file_info(pafs.FileSelector(bucket, allow_not_found=False)))  # lists one page
    if write:
        probe = join(loc, f".merg-write-check-{os.getpid()}")
        write_bytes(probe, b"")
        delete_file(probe)


@contextmanager
def local_copy(loc: Location, suffix_name: str | None = None) -> Iterator[Path]:
    """A local file with `loc`'s bytes for readers that need a path (decord, PyAV): the path itself when
    local; for a URI, a copy in this process's temp folder (named like the object), deleted on exit."""
    if not is_uri(loc):
        yield Path(loc)
        return
    folder = tempfile.mkdtemp(prefix="merg-clip-")
    target = Path(folder) / (suffix_name or name(loc))
    try:
        fs, path = filesystem(loc)
        with _call(loc, lambda: fs.open_input_stream(path)) as stream, open(target, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        yield target
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- one-line errors -------------------------------------------------------------------------------
_DENIED = ("SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId",
           "ACCESS_DENIED", "AccessDenied", "403 Forbidden", "InvalidToken", "ExpiredToken")  # fmt: skip
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket")
_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "error sending request", "Connection refused",
                "connection refused", "Failed to connect", "dns error", "timed out", "Timeout was reached")  # fmt: skip


def explain(loc: Location, exc: BaseException) -> str | None:
    """Why object storage refused, in words, for an error that is one of the known kinds; else None."""
    text = str(exc)
    current = settings()
    where = current.endpoint or "AWS S3"
    if any(marker in text for marker in _DENIED):
        return (f"access denied by {where}: wrong key or secret, or this identity may not use the bucket "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or storage.access_key_id / storage.secret_access_key)")  # fmt: skip
    if any(marker in text for marker in _NO_BUCKET):
        bucket = bucket_and_key(str(loc))[0] if is_uri(loc) else "?"
        return f"bucket {bucket!r} does not exist at {where}"
    if any(marker in text for marker in _UNREACHABLE):
        return f"cannot reach the endpoint {where} (AWS_ENDPOINT_URL or storage.endpoint; is the server running?)"
    return None


def storage_error(loc: Location, exc: BaseException) -> StorageError:
    why = explain(loc, exc) or (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return StorageError(f"{loc}: {why}")


def _call(loc: Location, action):
    """Run a pyarrow filesystem call; object-storage failures become one-line StorageErrors."""
    try:
        return action()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if not is_uri(loc) or isinstance(exc, StorageError):
            raise
        raise storage_error(loc, exc) from exc
