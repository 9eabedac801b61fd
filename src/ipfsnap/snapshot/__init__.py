"""ipfsnap.snapshot"""
