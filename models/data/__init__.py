"""Data loading: the user's arrays (:mod:`elbolab.models.data.arrays`) and images (:mod:`elbolab.models.data.images`).

``from elbolab.models.data import load_array`` reads a numeric CSV/.npy/.npz file; image sets for the VAE
(scikit-learn's digits, the user's image arrays) are in :mod:`elbolab.models.data.images`.
"""

from elbolab.models.data.arrays import load_array

__all__ = ["load_array"]
