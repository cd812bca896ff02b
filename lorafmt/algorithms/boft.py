"""BOFT (LyCORIS ``boft``): butterfly OFT, 4-D ``oft_blocks``; implemented in :mod:`lorafmt.algorithms.oft`."""

from lorafmt.algorithms.oft import BOFT

ALGORITHM = BOFT()
