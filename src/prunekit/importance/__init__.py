"""Channel and element importance: criteria, score context, selection and rounding.

The criteria module is imported first: it registers every built-in criterion (its last line
imports `elements`, which needs `element_masks`, which needs `criteria`), so importing any
module of this package alone finds them complete.
"""
from . import criteria  # noqa: F401
