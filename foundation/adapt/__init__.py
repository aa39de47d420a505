"""Downstream adaptation of a pretrained checkpoint: ``foundation adapt`` (see docs/adaptation.md).

``backbone`` loads any checkpoint kind as a frozen feature extractor, ``features`` extracts and caches
features, ``splits`` draws stratified fraction / K-shot subsets as split files, ``probe`` (linear
probe) / ``knn`` / ``finetune`` adapt, ``run`` runs one checkpoint on one dataset, ``suite`` a table of
datasets x methods x fractions, ``cli`` the command.
"""
