"""Turn a trained run into a bundle: strip, prune, fold BN, export ONNX, validate parity."""
