"""Pictures for a person's screen: a render's output (EXR, PNG, TIFF...) as an sRGB JPEG, with
OpenImageIO. The render node makes the web view's small previews with it, the coordinator a
frame's full-size view.

May import: ``errors``. Nothing else of ours: every layer that shows a picture may use it.
"""

from cio_worker.imaging.display import DisplayError, DisplaySettings, write_display_jpeg

__all__ = ["DisplayError", "DisplaySettings", "write_display_jpeg"]
