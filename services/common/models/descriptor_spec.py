"""The face chip and the descriptor: the one definition of the descriptor graph's interface.

Shared by the converter (install time), the chip aligner, the embedder, the quality and liveness checks (run
time) and matching's gallery. A chip is a dlib-aligned RGB face, ``CHIP_SIZE`` pixels square, cut with
``CHIP_PADDING`` around the landmarks' template (dlib's ``get_face_chip(img, shape, size=150, padding=0.25)``,
face_chip.py); the descriptor is the ``DESCRIPTOR_SIZE`` float32 values the graph gives for one chip.

Kept apart from convert/dlib_resnet.py so that running services never import the converter, which needs the
install-time ``onnx`` package, and free of imports so that any service (matching loads no model) can read it.
"""

INPUT_NAME = "chips"  # uint8 [N, 150, 150, 3] RGB
OUTPUT_NAME = "descriptors"  # float32 [N, 128]
CHIP_SIZE = 150
CHIP_PADDING = 0.25  # share of the landmarks' template on each side: dlib's default, the network's training
DESCRIPTOR_SIZE = 128
