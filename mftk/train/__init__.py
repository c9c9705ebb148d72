"""mftk trainer: `mftk train CONFIG.yaml` (see mftk.train.loop and mftk.train.config)."""
