"""Tests of the managed IPFS node and private networks."""
