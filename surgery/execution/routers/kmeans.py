"""``kmeans`` (upcycle's calibrated router): identical experts, nothing to predict, so each expert is made the
preferred one of a region of the router-input space.

The L2-normalised router inputs are clustered by k-means into one centroid per row; each row is its unit
centroid times the norm of a normal(0, std) row (std * sqrt(hidden)).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from surgery.errors import SurgeryError
from surgery.execution.routers.request import Fitted, RouterRequest


def kmeans(request: RouterRequest) -> Fitted:
    import torch  # lazy: the router registry is read by plans that never compute (plain upcycles)
    from sklearn.cluster import KMeans  # lazy: as torch

    inputs, rows = torch.as_tensor(request.inputs).float(), request.rows
    if inputs.shape[0] < rows:
        raise SurgeryError(f"calibration gave {inputs.shape[0]} tokens, fewer than the {rows} router rows to fit; "
                           "use a longer --calibration file")
    points = torch.nn.functional.normalize(inputs.double(), dim=1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points: sklearn warns and still returns `rows` centroids
        fitted = KMeans(n_clusters=rows, n_init=4, random_state=request.seed % 2**32).fit(points)
    centroids = torch.nn.functional.normalize(torch.from_numpy(np.asarray(fitted.cluster_centers_)), dim=1)
    scale = request.std * math.sqrt(request.hidden)  # the norm of a normal(0, std) row
    return Fitted((centroids * scale).float().contiguous())
