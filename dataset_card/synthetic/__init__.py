"""Labeled folders written through the contract without any model: textured shapes (`shapes`, the
tests' and the demo's data) and procedural scenes with exact labels (`scenes`, the ablation study's)."""
