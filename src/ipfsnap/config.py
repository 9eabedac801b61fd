"""Configuration: ``config.toml`` plus environment plus command-line overrides.

Precedence, highest first: command-line option, environment variable, config file, default.
Key names follow the reference (stargz-snapshotter's ``config.toml``) where the meaning is the
same; ipfsnap's own keys live beside them. Every default is documented in
``docs/configuration.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ipfsnap.docparse import MalformedDocument, parse_toml
from ipfsnap.errors import ConfigError

DEFAULT_STATE_DIR = Path("/var/lib/ipfsnap")
DEFAULT_CONFIG_PATH = Path("/etc/ipfsnap/config.toml")

ENV_STATE_DIR = "IPFSNAP_STATE_DIR"
ENV_CONFIG = "IPFSNAP_CONFIG"
ENV_IPFS_API = "IPFSNAP_IPFS_API"
ENV_IPFS_AUTH = "IPFSNAP_IPFS_AUTH"


@dataclass
class BlobConfig:
    """``[blob]``: how chunks are fetched from IPFS."""

    #: bytes a lazy read fetches at least (the reference's default is 50000; we round reads up
    #: to whole eStargz chunks anyway, so this is the minimum span of one request)
    chunk_size: int = 50000
    #: seconds one fetch (with its retries) may take before the read fails with EIO
    fetching_timeout_sec: int = 300
    #: retries of an idempotent read before it fails
    max_retries: int = 5
    min_wait_msec: int = 30
    max_wait_msec: int = 300
    #: reference key: the prefetch of a layer's prioritized range is split into requests of
    #: at most this many bytes (whole eStargz chunks), run ``prefetch_concurrency`` at once
    prefetch_chunk_size: int = 1 << 20
    #: on-demand reads also fetch the uncached chunks next to them, within the aligned
    #: windows of this many bytes they touch (0 = off; 262144 = one IPFS block: bytes that
    #: cross bitswap anyway; measured in docs/benchmarks.md, hello-bench)
    neighbour_span: int = 262144
    #: on-demand reads longer than this are sent as concurrent range requests cut on
    #: multiples of it (0 = one request per coalesced run)
    read_split_size: int = 0
    #: chunks fetched ahead of a file read from its start or sequentially (0 = off)
    readahead_chunks: int = 0


@dataclass
class BackgroundFetchConfig:
    """``[background_fetch]``: how the rest of a lazy layer is fetched after mounting."""

    #: no background request starts until no lazy layer served a read for this long
    silence_period_msec: int = 5000
    #: at least this long between two background requests (all layers together)
    fetch_period_msec: int = 250


@dataclass
class FuseConfig:
    """``[fuse]``: kernel cache timeouts, in seconds."""

    attr_timeout: float = 1.0
    entry_timeout: float = 1.0


@dataclass
class RunConfig:
    """``[run]``: starting containers."""

    #: bytes ``run --snapshotter=stargz`` reads ahead from the command's executable, its
    #: interpreter and shared libraries while runc starts the container (0 = off): python3
    #: with its libraries is ~10 MB, so 32 MiB covers a big program's start
    #: (runtime/warm.py; measured in docs/benchmarks.md, hello-bench)
    warm_bytes: int = 32 << 20
    #: ``image rpull --snapshotter=stargz`` asks the snapshotter to read the image's own
    #: command (Entrypoint + Cmd) ahead the same way, right after the pull, so its files
    #: cross the network while the pull exits and the run starts (service/warmups.py)
    warm_on_pull: bool = True
    #: the warm-ups also read what the program's start reads after the loader: its C
    #: library's locale and zone files and, for CPython, the start-up modules and the site
    #: directories' ``.pth`` files (runtime/startfiles.py; a guess: a file the program does
    #: not read costs one fetch)
    warm_start_files: bool = True


@dataclass
class Config:
    """All settings. Build with :func:`load_config`."""

    state_dir: Path = DEFAULT_STATE_DIR
    config_path: Path = DEFAULT_CONFIG_PATH
    #: IPFS API: a multiaddr (``/ip4/127.0.0.1/tcp/5001``) or URL; None = discover
    ipfs_api: str | None = None
    #: ``Authorization`` header value for the IPFS API (``Bearer x`` or ``Basic x``)
    ipfs_auth: str | None = None
    #: reference key: resolve ipfs:// urls (always true for ipfsnap, kept for compatibility)
    ipfs: bool = True
    noprefetch: bool = False
    no_background_fetch: bool = False
    #: bytes prefetched from the start of a layer with no prefetch landmark (0 = none)
    prefetch_size: int = 0
    prefetch_timeout_sec: int = 10
    #: concurrent blob fetches per layer
    max_concurrency: int = 2
    #: concurrent requests per layer while prefetching its prioritized range
    prefetch_concurrency: int = 4
    #: upper bound for the chunk cache, bytes (0 = unlimited)
    cache_size_limit: int = 0
    #: start a managed IPFS node when no API is found
    managed_ipfs: bool = True
    blob: BlobConfig = field(default_factory=BlobConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    background_fetch: BackgroundFetchConfig = field(default_factory=BackgroundFetchConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def ipfs_repo(self) -> Path:
        """Repository of the managed IPFS node (under the state dir, not ``~/.ipfs``)."""
        return self.state_dir / "ipfs"


def _coerce(section: str, obj: Any, data: dict[str, Any]) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"config: unknown key {section}{key!r}")
        current = getattr(obj, key)
        if isinstance(current, (BlobConfig, FuseConfig, BackgroundFetchConfig, RunConfig)):
            if not isinstance(value, dict):
                raise ConfigError(f"config: [{key}] must be a table")
            _coerce(f"{key}.", current, value)
            continue
        want: type[Any]
        if isinstance(current, bool):
            want = bool
        elif isinstance(current, int):
            want = int
        elif isinstance(current, float):
            want = float
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    value = float(value)
                except OverflowError:  # TOML integers are unbounded (0xfff...)
                    raise ConfigError(f"config: {section}{key} is out of range") from None
        elif isinstance(current, Path):
            if not isinstance(value, str):
                raise ConfigError(f"config: {section}{key} must be a string path")
            value = Path(value)
            want = Path
        else:
            want = str
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(
                f"config: {section}{key} must be {want.__name__}, got {type(value).__name__}"
            )
        # "not >= 0" also refuses nan
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
            raise ConfigError(f"config: {section}{key} must not be negative")
        setattr(obj, key, value)


def load_config(
    config_path: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    ipfs_api: str | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Load the configuration; a missing file at the *default* path is fine (defaults)."""
    env = os.environ if environ is None else environ
    explicit = config_path is not None or ENV_CONFIG in env
    path = Path(config_path or env.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH)
    cfg = Config(config_path=path)
    if path.exists():
        try:
            data = parse_toml(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {path}: cannot read: {exc}") from exc
        except MalformedDocument as exc:
            raise ConfigError(f"config {path}: invalid TOML: {exc}") from exc
        try:
            _coerce("", cfg, data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    elif explicit:
        raise ConfigError(f"config {path}: no such file")
    if env.get(ENV_STATE_DIR):
        cfg.state_dir = Path(env[ENV_STATE_DIR])
    if env.get(ENV_IPFS_API):
        cfg.ipfs_api = env[ENV_IPFS_API]
    if env.get(ENV_IPFS_AUTH):
        cfg.ipfs_auth = env[ENV_IPFS_AUTH]
    if state_dir is not None:
        cfg.state_dir = Path(state_dir)
    if ipfs_api is not None:
        cfg.ipfs_api = ipfs_api
    cfg.state_dir = cfg.state_dir.absolute()
    return cfg
