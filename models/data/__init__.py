"""Data loading: the user's arrays (:mod:`models.data.arrays`) and images (:mod:`models.data.images`).

``from models.data import load_array`` reads a numeric CSV/.npy/.npz file; image sets for the VAE
(scikit-learn's digits, the user's image arrays) are in :mod:`models.data.images`.
"""

from models.data.arrays import load_array

__all__ = ["load_array"]
