"""From files to uint8 batches, and the statistics that normalise them.

images.py decodes a file to the paper's fixed-size image; loader.py batches a split in
the order of an epoch; stats.py computes the mean image and RGB PCA; augment.py turns a
uint8 batch into the network's input on the training device (crops, flips, lighting).
store.py and prepare.py hold a dataset decoded once; source.py decides "store or
folder" for training and evaluation. ilsvrc.py, cifar.py, imagenet.py and synthetic.py
know particular datasets.
"""
