"""SimCLRv2 for greyscale and colour scans: encoder, projection head, NT-Xent loss, two-view transforms.

Pure PyTorch: no Django, no settings; every constructor takes explicit arguments.
"""
