"""Hazardous primitives, kept in one place.

Only this package imports ``cryptography.hazmat``, ``cryptography.x509`` and ``tenseal``
(a test checks the import graph). Everything else calls the recipes defined here.
"""
