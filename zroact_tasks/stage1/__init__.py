"""Stage 1: action detection over 16-frame clips (YOWOv3 layout, onnxruntime)."""
