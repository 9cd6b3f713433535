"""The dataset card of a labeled folder: its YAML header (`readme`) and body (`sections`, with
`provenance`, `data_format` and `statistics`, written with `markdown`'s pieces), what the images are
(`source`), the run's facts read back from its small files (`run_summary`), the gallery and
histograms (`gallery`), and `build`, which writes it all."""
