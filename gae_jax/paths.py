"""Paths: every file gae_jax reads or writes goes through `etils.epath` (orbax's path type).

User paths (workdirs, checkpoints, data roots, latent caches, reports, converted weights)
may be local or remote (`gs://`, `s3://`, `az://`, `hf://`, which epath serves through
fsspec: gcsfs, s3fs, ...); `path()` makes both an `epath.Path`, local ones absolute.
Local-only things (the user cache dir below, the XLA cache, temporary files) stay local.

Remote object stores have no append and no atomic rename, but an object upload is atomic
(it appears only when complete); so `write_bytes`/`write_text` write local files through a
temporary name + os.replace and remote ones directly, and `put_file` uploads a file a
local-only library wrote (ArrayRecord shards, tensorboardX events).

`configure_cloud_storage()` (called by main and the loaders) makes epath use fsspec rather
than TensorFlow's gfile, and, when `STORAGE_EMULATOR_HOST` names a GCS-API emulator (as
gcsfs and Google's client libraries read it), points every layer at it:
  - gcsfs (epath's gs:// backend): reads STORAGE_EMULATOR_HOST itself; anonymous token;
    its experimental zonal/HNS bucket probe (a gRPC call an emulator does not serve, which
    times out after 60 s) off;
  - tensorstore (orbax's array writes): TENSORSTORE_GCS_HTTP_URL and a fixed test token
    (GOOGLE_AUTH_TOKEN_FOR_TESTING), read once per process, so this must run first.
"""

import os
import pathlib
import shutil
import tempfile
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def cache_dir(*parts: str) -> pathlib.Path:
  """Returns (and creates) `$GAE_JAX_CACHE/<parts>`, default `~/.cache/gae_jax`."""
  root = os.environ.get("GAE_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gae_jax")
  path = pathlib.Path(root, *parts)
  path.mkdir(parents=True, exist_ok=True)
  return path


def is_remote(p: PathLike) -> bool:
  """True for gs://, s3://, az://, hf:// paths (str or epath.Path)."""
  return os.fspath(p).startswith(REMOTE_SCHEMES)


def path(p: PathLike) -> epath.Path:
  """A user path as an epath.Path: remote ones as they are, local ones absolute (~ expanded).

  Raises ValueError for a URL scheme epath cannot serve (e.g. 'http://...').
  """
  if isinstance(p, epath.Path) and is_remote(p):
    return p
  s = os.fspath(p)
  if is_remote(s):
    return epath.Path(s)
  if "://" in s:
    raise ValueError(f"path {s!r}: unsupported URL scheme (use a local path or one of "
                     f"{', '.join(REMOTE_SCHEMES)})")
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def join(p: PathLike, *parts: str) -> str:
  """`os.path.join` that keeps `gs://` prefixes (returns a str)."""
  return os.fspath(path(p).joinpath(*parts))


def configure_cloud_storage() -> None:
  """Points epath/gcsfs/tensorstore at GCS or at the emulator in STORAGE_EMULATOR_HOST.

  Idempotent; only sets variables the user has not set. Call it before the first remote
  path is touched (tensorstore reads its variables once, gcsfs its config per instance).
  """
  os.environ.setdefault("EPATH_USE_TF", "false")   # epath: fsspec (gcsfs), never tf.io.gfile
  host = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if host in ("", "default"):
    return
  url = host if host.startswith(("http://", "https://")) else f"http://{host}"
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")
  try:  # gcsfs picks its class at import: use the plain one even if imported already
    from gcsfs import core as gcsfs_core  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs_core.GCSFileSystem, clobber=True)


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `data` to `p` all-or-nothing: local via a temporary name + os.replace (parents
  created), remote as one object upload (atomic by itself)."""
  p = path(p)
  if is_remote(p):
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=os.fspath(p.parent))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, os.fspath(p))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def makedirs(p: PathLike) -> epath.Path:
  """Creates a directory (a no-op on object stores, which have none); returns it."""
  p = path(p)
  p.mkdir(parents=True, exist_ok=True)
  return p


def put_file(local: PathLike, dst: PathLike) -> None:
  """Copies a local file to `dst` (local or remote), all-or-nothing."""
  dst = path(dst)
  if is_remote(dst):
    with open(local, "rb") as src, dst.open("wb") as out:
      shutil.copyfileobj(src, out, 1 << 22)
    return
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = f"{os.fspath(dst)}.tmp-{os.getpid()}"
  try:
    shutil.copyfile(local, tmp)
    os.replace(tmp, os.fspath(dst))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def local_mirror(p: PathLike) -> pathlib.Path:
  """Where `local_copy` keeps remote file `p`: `cache_dir('remote', scheme, bucket, ...)`
  (parents created). A writer may put the file there itself before uploading it, so this
  host never downloads what it wrote."""
  scheme, rest = os.fspath(p).split("://", 1)
  return cache_dir("remote", scheme, *os.path.dirname(rest).split("/")) / os.path.basename(rest)


def local_copy(p: PathLike, *, what: str = "file") -> str:
  """A local filename with `p`'s contents, for libraries that only open local files
  (ArrayRecord readers, torch.load): `p` itself when local, else a copy in the user cache
  (`local_mirror(p)`), fetched once: kept while its size and modification time (set to
  the object's, whole seconds) match the object's; fetched again otherwise."""
  p = path(p)
  if not is_remote(p):
    return os.fspath(p)
  s = os.fspath(p)
  dst = local_mirror(p)
  if not p.exists():
    raise FileNotFoundError(f"{what} {s} not found")
  if _mirror_matches(p, dst):
    return str(dst)
  tmp = f"{dst}.tmp-{os.getpid()}"
  try:
    with p.open("rb") as src, open(tmp, "wb") as out:
      shutil.copyfileobj(src, out, 1 << 22)
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  stamp_mirror(p, dst)
  return str(dst)


def stamp_mirror(remote: PathLike, local: PathLike) -> None:
  """Sets `local`'s mtime to remote object's (after a download, or after an upload of
  `local` to `remote`), which is how `local_copy` knows the mirror is current."""
  mtime = path(remote).stat().mtime
  if mtime:
    os.utime(local, (mtime, mtime))


def _mirror_matches(remote: epath.Path, local: pathlib.Path) -> bool:
  if not local.is_file():
    return False
  st = remote.stat()
  return bool(st.mtime) and local.stat().st_size == st.length and int(
      local.stat().st_mtime) == int(st.mtime)
