"""ipfsnap.runtime: OCI runtime bundles from a plain container config, and runc.

Independent of images and snapshots: callers pass a function that mounts the rootfs and one
that releases it (see :class:`ContainerStore.run`).
"""

from ipfsnap.runtime.containers import (
    ContainerRecord,
    ContainerStatus,
    ContainerStore,
    is_mountpoint,
    unmount_all,
    validate_id,
)
from ipfsnap.runtime.errors import (
    BadRunOption,
    BundleError,
    ContainerExists,
    ContainerNotFound,
    ContainerRunning,
    Interrupted,
    RuncError,
    UserNotFound,
)
from ipfsnap.runtime.runc import Runc, RuncState
from ipfsnap.runtime.spec import (
    BindMount,
    ContainerConfig,
    ResolvedUser,
    build_spec,
    image_args,
    merge_env,
    parse_env,
    parse_mount,
    resolve_user,
    write_bundle,
)

__all__ = [
    "BadRunOption",
    "BindMount",
    "BundleError",
    "ContainerConfig",
    "ContainerExists",
    "ContainerNotFound",
    "ContainerRecord",
    "ContainerRunning",
    "ContainerStatus",
    "ContainerStore",
    "Interrupted",
    "ResolvedUser",
    "Runc",
    "RuncError",
    "RuncState",
    "UserNotFound",
    "build_spec",
    "image_args",
    "is_mountpoint",
    "merge_env",
    "parse_env",
    "parse_mount",
    "resolve_user",
    "unmount_all",
    "validate_id",
    "write_bundle",
]
