"""ipfsnap.estargz"""
