"""histossl: self-supervised pretraining studies for histopathology with scarce labels."""

__version__ = "0.1.0"
