"""ipfsnap.oci"""
