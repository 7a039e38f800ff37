"""`duplex bench`: a load benchmark of the whole chain (not part of CI)."""
