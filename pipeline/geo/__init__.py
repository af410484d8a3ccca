"""Large scenes: cutting GeoTIFF scenes into tiles (`make-tiles`), sliding-window prediction of a scene
into a Cloud-Optimised GeoTIFF, and masks vectorised into building polygons.
"""

from pipeline.core.errors import BuildsegError


class GeoError(BuildsegError, ValueError):
    """A scene, mask raster or tiling setting that cannot be used; the message names the file and the fix."""
