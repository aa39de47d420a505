"""Losses as plain functions (and the modules some of them own). One file per loss, one line in LOSSES."""

from foundation.losses.infonce import infonce, multi_view_infonce, one_way_infonce
from foundation.losses.mlm import mask_tokens, mlm_loss
from foundation.losses.nns import NearestNeighbourQueue
from foundation.losses.simsiam import SimSiamHead, simsiam_loss

LOSSES = {
    "infonce": infonce,
    "multi_view_infonce": multi_view_infonce,
    "one_way_infonce": one_way_infonce,
    "simsiam": simsiam_loss,
    "mlm": mlm_loss,
}

__all__ = ["LOSSES", "NearestNeighbourQueue", "SimSiamHead", "infonce", "mask_tokens", "mlm_loss",
           "multi_view_infonce", "one_way_infonce", "simsiam_loss"]
