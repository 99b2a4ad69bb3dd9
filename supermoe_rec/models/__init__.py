"""Models assembled from built modules (SparseArch, encoder or MLP backbone, towers); no tables are built here."""
