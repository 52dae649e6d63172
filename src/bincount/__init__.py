"""bincount: count the objects in warehouse bin photos, from fetch to endpoint."""

__version__ = "0.1.0"
