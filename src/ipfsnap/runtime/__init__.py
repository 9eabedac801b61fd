"""ipfsnap.runtime"""
