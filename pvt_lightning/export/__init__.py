"""Export for deployment: ONNX and torch.export files, their metadata, runtimes and parity checks."""
