"""Shards: every way a dataset becomes WebDataset tars (folder.py, hf.py, fashion_mnist.py, through
writer.py and tars.py), indexing tars made elsewhere (index.py) and shuffling class-ordered ones
(reshard.py), how classes spread over shards (class_spread.py), and reading them (tars.py,
images.py, manifest.py).
"""
