"""Data: exact 2D laws, image data sets, and the LightningDataModules that serve them."""
