"""ipfsnap.content"""
