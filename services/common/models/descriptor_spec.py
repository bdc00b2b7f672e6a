"""The interface of the descriptor graph, shared by the converter (install time) and the embedder (run time).

Kept apart from convert/dlib_resnet.py so that running services never import the converter, which needs the install-time
``onnx`` package.
"""

INPUT_NAME = "chips"  # uint8 [N, 150, 150, 3] RGB
OUTPUT_NAME = "descriptors"  # float32 [N, 128]
CHIP_SIZE = 150
DESCRIPTOR_SIZE = 128
