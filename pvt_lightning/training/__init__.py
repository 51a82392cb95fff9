"""Training: the LightningModule, its losses, optimiser groups and schedule, recipes and callbacks."""
