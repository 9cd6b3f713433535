"""Reading a labeled folder for pretraining: `loader` (row groups -> augmented, masked batches) and
`augment` (one crop and flip shared by the image and both label maps)."""
