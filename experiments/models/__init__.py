"""Embedding networks: image backbones (the small CNN, ResNets, torchvision and timm), the text tower
and the two-tower model for cross-modal retrieval."""
