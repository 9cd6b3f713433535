"""Labeling stage: segmentation models over an image folder, written as contract shards with Ray."""
