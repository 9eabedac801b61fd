"""ipfsnap.fs"""
