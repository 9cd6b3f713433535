"""How good the labels are, against human ground truth: `ground_truth` (COCO / ADE20K / panoptic
readers), `metrics` (pure scores), `report` (`python -m labeling.evaluate`), `sweep` (quality
against speed over labeler settings)."""
