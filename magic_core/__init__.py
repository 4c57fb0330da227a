"""Magic Portrait algorithms. Imports torch/numpy/cv2 only and never ComfyUI, so it is testable on its own."""
