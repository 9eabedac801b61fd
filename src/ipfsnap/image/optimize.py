"""``ipfsnap image optimize``: eStargz layers with the files a workload reads put first.

1. :func:`ipfsnap.image.record.record_workload` runs the workload once on the image's layers
   (unpacked, overlayfs) under strace and lists the paths it opened or executed, in order.
2. :func:`ipfsnap.image.record.resolve_files` gives each layer the files it provides (the
   top-most layer holding a path wins; symlinks and their targets both count).
3. Every layer is rebuilt as eStargz from its ORIGINAL blob with its own list prioritized:
   those files (with their parent directories and hardlink targets) come before
   ``.prefetch.landmark``, so the lazy snapshotter prefetches exactly them before the
   container starts. The config gets the new diffIDs, the manifest the new layers.

The same recipe feeds ``ipfs-push --optimize`` (:func:`optimized_convert_options`), so the
pushed image carries the prioritized layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from ipfsnap.content import ImageStore, ResolvedImage
from ipfsnap.image.convert import ConvertOptions, ConvertResult, convert_image
from ipfsnap.image.record import LayerFiles, Recording, Workload, record_workload, resolve_files
from ipfsnap.oci import Platform
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizeResult:
    """An optimized image and how it was made."""

    name: str
    recording: Recording
    #: per layer (bottom first): the prioritized files
    files: LayerFiles
    conversion: ConvertResult


@dataclass(frozen=True)
class Plan:
    """What a recording says to prioritize, ready for a conversion."""

    recording: Recording
    files: LayerFiles
    options: ConvertOptions


def optimized_convert_options(
    images: ImageStore,
    ref: str,
    workload: Workload,
    base: ConvertOptions | None = None,
    *,
    state_dir: Path,
    platform: Platform | None = None,
    output: IO[Any] | int | None = None,
) -> Plan:
    """Record ``workload`` on image ``ref`` and return ``base`` with every layer's own
    prioritized files (``prioritize_per_layer``), keyed by the source layer digests."""
    image: ResolvedImage = images.resolve(ref, platform)
    recording = record_workload(images, image, workload, state_dir=state_dir, output=output)
    files = resolve_files(images, image.layers, recording.accessed)
    per_layer = tuple(
        (layer.digest, tuple(names))
        for layer, names in zip(image.layers, files.files, strict=True)
    )
    for layer, names in per_layer:
        log.info("image %s: layer %s: %d prioritized files", image.record.name, layer,
                 len(names))
    opts = replace(base or ConvertOptions(), estargz=True, prioritize_per_layer=per_layer)
    if platform is not None and not opts.platforms:
        opts = replace(opts, platforms=(platform,))
    return Plan(recording, files, opts)


def optimize_image(
    images: ImageStore,
    ref: str,
    new_ref: str,
    workload: Workload,
    base: ConvertOptions | None = None,
    *,
    state_dir: Path,
    platform: Platform | None = None,
    output: IO[Any] | int | None = None,
    progress: Progress | None = None,
) -> OptimizeResult:
    """Record ``workload`` on ``ref``, rebuild its layers with the files it read first, and
    name the result ``new_ref`` in the local store (see the module docstring)."""
    plan = optimized_convert_options(images, ref, workload, base, state_dir=state_dir,
                                     platform=platform, output=output)
    record = images.get(ref)
    what = f"image {record.name}"
    created: set[str] = set()
    try:
        with images.lease():
            conv = convert_image(images, record.target, plan.options, state_dir=state_dir,
                                 what=what, progress=progress)
            created |= conv.created
            named = images.put(new_ref, conv.target)
    except BaseException as exc:
        created |= getattr(exc, "created", set())
        if created:
            try:
                images.discard_unreferenced(created)
            except Exception as cleanup:
                log.warning("%s: could not remove the blobs of the failed optimize: %s", what,
                            cleanup)
        raise
    log.info("%s: optimized as %s (%d files prioritized, %d layers built)", what, named.name,
             len(plan.files.all()), conv.built)
    return OptimizeResult(named.name, plan.recording, plan.files, conv)
