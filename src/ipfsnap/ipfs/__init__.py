"""ipfsnap.ipfs"""
