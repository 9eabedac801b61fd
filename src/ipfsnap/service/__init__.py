"""ipfsnap.service"""
