"""The bundled demo: a small CNN on scikit-learn's handwritten digits (no download needed)."""
