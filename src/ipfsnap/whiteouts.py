"""How a layer says "deleted" and "opaque", in both forms ipfsnap meets.

In a layer tar (the OCI image spec's changeset format, and so in an eStargz TOC): a
``.wh.NAME`` entry deletes ``NAME`` of the lower layers, a ``.wh..wh..opq`` entry in a
directory hides everything the lower layers have in it. On disk, as overlayfs reads a layer
directory: a deleted name is a character device 0/0, an opaque directory carries the
``trusted.overlay.opaque=y`` xattr. The layer filesystem (fs/), the unpacker (snapshot/),
the layer stack reader (runtime/) and the recorder (image/) all translate between the two;
the names live here so they cannot drift apart.
"""

#: a tar entry ``.wh.NAME`` deletes ``NAME`` in the layers below
WHITEOUT_PREFIX = ".wh."
#: a tar entry of this name makes its directory opaque
OPAQUE_WHITEOUT = ".wh..wh..opq"
#: the xattr (value ``y``) overlayfs reads to make a directory opaque
OPAQUE_XATTR = "trusted.overlay.opaque"
