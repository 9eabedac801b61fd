"""ipfsnap.image"""
