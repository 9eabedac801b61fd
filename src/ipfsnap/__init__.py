"""ipfsnap: run OCI container images straight from IPFS with lazy pulling."""

__version__ = "0.1.0"
