"""MACs/params of an ONNX graph, one counter per operator family."""
