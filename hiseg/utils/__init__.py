"""Small building blocks of the shared core that belong to no model, dataset or engine part."""
