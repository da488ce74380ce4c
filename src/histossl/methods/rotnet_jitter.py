"""RotNet+Jitter: RotNet with an independent colour and stain jitter for each rotated copy.

The seed report's variant. Since the four copies of an image differ in colour, the head cannot match
them by colour and has to look at structure. The pixel steps of ``augment.PIPELINE`` (stain jitter,
colour jitter and grayscale, blur, solarize, settings from ``pretrain.views``) run on each rotated
copy in the pipeline's order; the geometry is drawn once per image.
"""

from histossl.methods import METHODS
from histossl.methods.rotnet import RotNet, RotNetConfig


@METHODS.register("rotnet_jitter", config=RotNetConfig)
class RotNetJitter(RotNet):
    jitter_each_copy = True
