"""Handing the winner over: ONNX export with a parity check (and an int8 copy), for use outside raycls."""
