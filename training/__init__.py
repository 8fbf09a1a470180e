"""Headless training: datasets over BraTS roots and corrections stores, losses, one loop.

Never imports Qt or napari; the napari widget calls these same functions.
"""
